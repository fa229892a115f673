//! (being built)

use leptos::prelude::*;

#[component]
pub fn PlaygroundPage() -> impl IntoView {
    view! { <section class="page" id="playground-page"><h1>"PlaygroundPage"</h1></section> }
}
