//! (being built)

use leptos::prelude::*;

#[component]
pub fn ArenaPage() -> impl IntoView {
    view! { <section class="page" id="arena-page"><h1>"ArenaPage"</h1></section> }
}
