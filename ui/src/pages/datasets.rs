//! (being built)

use leptos::prelude::*;

#[component]
pub fn DatasetWizard() -> impl IntoView {
    view! { <section class="page" id="datasets-page"><h1>"DatasetWizard"</h1></section> }
}
