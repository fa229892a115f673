//! Pieces every page uses: error notes, two-step delete, progress bars, labelled
//! fields with a one-line explanation, and the model picker.

use crate::AppCtx;
use attune_protocol::IpcError;
use leptos::prelude::*;

/// A readable error beside what caused it: the sentence, then the stable code.
pub fn error_note(err: &IpcError) -> impl IntoView {
    view! {
        <div class="notice error" role="alert" data-testid="error">
            <span class="error-message">{err.message.clone()}</span>
            <code class="error-code">{err.code.as_str()}</code>
        </div>
    }
}

/// Shows `error` while it is set.
#[component]
pub fn ErrorSlot(error: RwSignal<Option<IpcError>>) -> impl IntoView {
    move || error.get().map(|e| error_note(&e))
}

/// A delete button that asks once more before acting: the first click arms it
/// ("Really delete?"), the second calls `on_confirm`, and any other click away
/// (or 4 seconds) disarms it.
#[component]
pub fn ConfirmButton(
    #[prop(into)] label: String,
    #[prop(into, default = "Really delete?".to_string())] confirm_label: String,
    #[prop(into, optional)] id: Option<String>,
    #[prop(into, optional)] disabled: Option<Signal<bool>>,
    on_confirm: Callback<()>,
) -> impl IntoView {
    let armed = RwSignal::new(false);
    let click = move |_| {
        if armed.get_untracked() {
            armed.set(false);
            on_confirm.run(());
        } else {
            armed.set(true);
            set_timeout(move || armed.set(false), std::time::Duration::from_secs(4));
        }
    };
    let label_text = move || {
        if armed.get() {
            confirm_label.clone()
        } else {
            label.clone()
        }
    };
    view! {
        <button
            class="danger"
            class:armed=move || armed.get()
            id=id
            disabled=move || disabled.map(|d| d.get()).unwrap_or(false)
            on:click=click
        >
            {label_text}
        </button>
    }
}

/// A progress bar; `fraction` None shows an indeterminate bar.
#[component]
pub fn Progress(
    #[prop(into)] fraction: Signal<Option<f64>>,
    #[prop(into, optional)] label: Option<Signal<String>>,
) -> impl IntoView {
    view! {
        <div class="progress" role="progressbar">
            <div
                class="progress-bar"
                class:indeterminate=move || fraction.get().is_none()
                style:width=move || {
                    fraction
                        .get()
                        .map(|f| format!("{:.1}%", (f.clamp(0.0, 1.0) * 100.0)))
                        .unwrap_or_else(|| "30%".into())
                }
            ></div>
            {move || label.map(|l| view! { <span class="progress-label">{l.get()}</span> })}
        </div>
    }
}

/// A labelled form field with a one-line explanation under it.
#[component]
pub fn Field(
    #[prop(into)] label: String,
    #[prop(into, optional)] hint: Option<String>,
    children: Children,
) -> impl IntoView {
    view! {
        <label class="field">
            <span class="field-label">{label}</span>
            {children()}
            {hint.map(|h| view! { <span class="field-hint">{h}</span> })}
        </label>
    }
}

/// A select over the library's models; picks the first one when none is chosen.
#[component]
pub fn ModelSelect(
    selected: RwSignal<Option<i64>>,
    #[prop(into, optional)] id: Option<String>,
) -> impl IntoView {
    let ctx = AppCtx::get();
    Effect::new(move |_| {
        if let Some(Ok(list)) = ctx.models.get() {
            let known = selected
                .get_untracked()
                .is_some_and(|s| list.iter().any(|m| m.id == s));
            if !known {
                selected.set(list.first().map(|m| m.id));
            }
        }
    });
    view! {
        <select
            class="model-select"
            id=id
            on:change=move |ev| selected.set(event_target_value(&ev).parse().ok())
            prop:value=move || selected.get().map(|s| s.to_string()).unwrap_or_default()
        >
            {move || match ctx.models.get() {
                Some(Ok(list)) if !list.is_empty() => {
                    list.into_iter()
                        .map(|m| {
                            let id = m.id;
                            view! {
                                <option value=id.to_string() selected=move || selected.get() == Some(id)>
                                    {format!("{} ({}, {})", m.name, crate::format::parameters(m.parameters), m.quantization)}
                                </option>
                            }
                        })
                        .collect_view()
                        .into_any()
                }
                _ => view! { <option value="">"No models in the library"</option> }.into_any(),
            }}
        </select>
    }
}
