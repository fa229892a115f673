//! (being built)

use leptos::prelude::*;

#[component]
pub fn RunsPage() -> impl IntoView {
    view! { <section class="page" id="runs-page"><h1>"RunsPage"</h1></section> }
}
