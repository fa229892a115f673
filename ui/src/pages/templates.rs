//! (being built)

use leptos::prelude::*;

#[component]
pub fn TemplatesPage() -> impl IntoView {
    view! { <section class="page" id="templates-page"><h1>"TemplatesPage"</h1></section> }
}
