//! (being built)

use leptos::prelude::*;

#[component]
pub fn AdaptWizard() -> impl IntoView {
    view! { <section class="page" id="adapt-page"><h1>"AdaptWizard"</h1></section> }
}
