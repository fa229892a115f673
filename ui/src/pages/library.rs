//! (being built)

use leptos::prelude::*;

#[component]
pub fn LibraryPage() -> impl IntoView {
    view! { <section class="page" id="library-page"><h1>"LibraryPage"</h1></section> }
}
