//! Line charts drawn by uPlot (vendored in `ui/vendor/uplot`, loaded as the global
//! `uPlot`). [`LineChart`] owns one plot: it is created when the element mounts,
//! fed new data with `setData` while the series stay the same, rebuilt when they
//! change, resized with the window, and destroyed with the component.

use leptos::prelude::*;
use serde::Serialize;
use wasm_bindgen::{JsCast, JsValue};

/// One line.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub label: String,
    /// A CSS colour.
    pub color: String,
    /// One value per x; None leaves a gap, bridged by the line.
    pub values: Vec<Option<f64>>,
    /// Draw markers at each value (sparse series such as eval loss).
    pub points: bool,
    /// Draw the line dashed (e.g. a second run compared with the first).
    pub dashed: bool,
}

/// What a chart shows: shared x values and the lines over them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChartData {
    pub x: Vec<f64>,
    pub series: Vec<Series>,
}

/// A line given as points: (label, colour, draw markers, [(x, y)]).
pub type PointLine = (String, String, bool, Vec<(f64, f64)>);

impl ChartData {
    /// Builds aligned data from several (x, y) point lists: the x axis is the sorted
    /// union of every x, and each series has None where it has no point.
    pub fn from_points(lines: Vec<PointLine>) -> ChartData {
        let mut xs: Vec<f64> = lines
            .iter()
            .flat_map(|(_, _, _, pts)| pts.iter().map(|p| p.0))
            .filter(|x| x.is_finite())
            .collect();
        xs.sort_by(|a, b| a.total_cmp(b));
        xs.dedup();
        let series = lines
            .into_iter()
            .map(|(label, color, points, pts)| {
                let mut values = vec![None; xs.len()];
                for (x, y) in pts {
                    if let Ok(i) = xs.binary_search_by(|v| v.total_cmp(&x)) {
                        if y.is_finite() {
                            values[i] = Some(y);
                        }
                    }
                }
                Series {
                    label,
                    color,
                    values,
                    points,
                    dashed: false,
                }
            })
            .collect();
        ChartData { x: xs, series }
    }

    fn shape(&self) -> Vec<(String, String, bool)> {
        self.series
            .iter()
            .map(|s| (s.label.clone(), s.color.clone(), s.points))
            .collect()
    }

    fn has_values(&self) -> bool {
        self.series
            .iter()
            .any(|s| s.values.iter().any(Option::is_some))
    }
}

#[derive(Serialize)]
struct Opts<'a> {
    width: f64,
    height: f64,
    title: &'a str,
    scales: serde_json::Value,
    series: Vec<serde_json::Value>,
    axes: Vec<serde_json::Value>,
    legend: serde_json::Value,
    cursor: serde_json::Value,
}

fn options(title: &str, x_label: &str, width: f64, height: f64, data: &ChartData) -> JsValue {
    let axis = |label: &str| {
        serde_json::json!({
            "label": label,
            "stroke": "#8a90a8",
            "grid": { "stroke": "rgba(128,128,140,0.18)", "width": 1 },
            "ticks": { "stroke": "rgba(128,128,140,0.3)", "width": 1 },
        })
    };
    let mut series = vec![serde_json::json!({ "label": x_label })];
    for s in &data.series {
        series.push(serde_json::json!({
            "label": s.label,
            "stroke": s.color,
            "width": 2,
            "spanGaps": true,
            "dash": if s.dashed { serde_json::json!([6, 4]) } else { serde_json::json!(null) },
            "points": { "show": s.points, "size": 6, "fill": s.color },
        }));
    }
    let opts = Opts {
        width,
        height,
        title,
        scales: serde_json::json!({ "x": { "time": false } }),
        series,
        axes: vec![axis(x_label), axis("")],
        legend: serde_json::json!({ "live": true }),
        cursor: serde_json::json!({ "drag": { "x": true, "y": false } }),
    };
    let json = serde_json::to_string(&opts).unwrap_or_else(|_| "{}".into());
    let value = js_sys::JSON::parse(&json).unwrap_or(JsValue::NULL);
    // `dash: null` is not a valid dash array; drop it.
    if let Ok(list) = js_sys::Reflect::get(&value, &JsValue::from_str("series")) {
        let list: js_sys::Array = list.unchecked_into();
        for s in list.iter() {
            if js_sys::Reflect::get(&s, &JsValue::from_str("dash"))
                .map(|d| d.is_null())
                .unwrap_or(false)
            {
                let _ = js_sys::Reflect::delete_property(
                    s.unchecked_ref::<js_sys::Object>(),
                    &JsValue::from_str("dash"),
                );
            }
        }
    }
    // Tick labels formatted here (uPlot's default rounds 2e-4 to "0"); CSP forbids
    // building the function in JS, so it is a wasm closure.
    if let Ok(axes) = js_sys::Reflect::get(&value, &JsValue::from_str("axes")) {
        let axes: js_sys::Array = axes.unchecked_into();
        let format = wasm_bindgen::closure::Closure::<
            dyn Fn(JsValue, js_sys::Array) -> js_sys::Array,
        >::new(|_plot: JsValue, splits: js_sys::Array| {
            splits
                .iter()
                .map(|v| JsValue::from_str(&tick_label(v.as_f64().unwrap_or(f64::NAN))))
                .collect::<js_sys::Array>()
        })
        .into_js_value();
        let _ = js_sys::Reflect::set(&axes.get(1), &JsValue::from_str("values"), &format);
    }
    value
}

/// A y-axis tick: plain for ordinary magnitudes, scientific for tiny or huge ones.
pub fn tick_label(v: f64) -> String {
    if !v.is_finite() {
        return String::new();
    }
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if !(1e-2..1e5).contains(&a) {
        format!("{v:.1e}")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

fn js_data(data: &ChartData) -> JsValue {
    let out = js_sys::Array::new();
    out.push(
        &data
            .x
            .iter()
            .map(|v| JsValue::from_f64(*v))
            .collect::<js_sys::Array>(),
    );
    for s in &data.series {
        out.push(
            &s.values
                .iter()
                .map(|v| v.map(JsValue::from_f64).unwrap_or(JsValue::NULL))
                .collect::<js_sys::Array>(),
        );
    }
    out.into()
}

fn call(target: &JsValue, method: &str, args: &[JsValue]) {
    if let Ok(f) = js_sys::Reflect::get(target, &JsValue::from_str(method)) {
        if let Ok(f) = f.dyn_into::<js_sys::Function>() {
            let arr: js_sys::Array = args.iter().cloned().collect();
            let _ = f.apply(target, &arr);
        }
    }
}

fn new_plot(opts: &JsValue, data: &JsValue, el: &web_sys::Element) -> Option<JsValue> {
    let ctor = js_sys::Reflect::get(&js_sys::global(), &JsValue::from_str("uPlot")).ok()?;
    let ctor: js_sys::Function = ctor.dyn_into().ok()?;
    let args: js_sys::Array = [opts.clone(), data.clone(), el.clone().into()]
        .into_iter()
        .collect();
    js_sys::Reflect::construct(&ctor, &args).ok()
}

struct Plot {
    js: JsValue,
    shape: Vec<(String, String, bool)>,
}

/// A line chart of `data`. `id` names the container (for tests); the chart keeps
/// the container's width and `height` pixels.
#[component]
pub fn LineChart(
    #[prop(into)] title: String,
    #[prop(into)] data: Signal<ChartData>,
    #[prop(into, default = "step".to_string())] x_label: String,
    #[prop(default = 220.0)] height: f64,
    #[prop(into, optional)] id: Option<String>,
) -> impl IntoView {
    let node = NodeRef::<leptos::html::Div>::new();
    let plot: StoredValue<Option<Plot>, LocalStorage> = StoredValue::new_local(None);

    let width_of = move || -> f64 {
        node.get_untracked()
            .map(|el| f64::from(el.client_width()))
            .filter(|w| *w > 50.0)
            .unwrap_or(480.0)
    };

    {
        let title = title.clone();
        let x_label = x_label.clone();
        Effect::new(move |_| {
            let d = data.get();
            let Some(el) = node.get() else { return };
            plot.update_value(|slot| {
                if !d.has_values() {
                    if let Some(p) = slot.take() {
                        call(&p.js, "destroy", &[]);
                    }
                    return;
                }
                let shape = d.shape();
                match slot.as_ref() {
                    Some(p) if p.shape == shape => call(&p.js, "setData", &[js_data(&d)]),
                    _ => {
                        if let Some(p) = slot.take() {
                            call(&p.js, "destroy", &[]);
                        }
                        let opts = options(&title, &x_label, width_of(), height, &d);
                        if let Some(js) = new_plot(&opts, &js_data(&d), &el) {
                            *slot = Some(Plot { js, shape });
                        }
                    }
                }
            });
        });
    }

    // Follow the container's width (the window resizing, or the page being shown:
    // hidden pages have no width) with a ResizeObserver.
    {
        let observer: StoredValue<Option<JsValue>, LocalStorage> = StoredValue::new_local(None);
        Effect::new(move |_| {
            let Some(el) = node.get() else { return };
            if observer.with_value(Option::is_some) {
                return;
            }
            let resize = wasm_bindgen::closure::Closure::<dyn FnMut()>::new(move || {
                plot.with_value(|p| {
                    if let Some(p) = p {
                        let size = js_sys::Object::new();
                        let _ = js_sys::Reflect::set(&size, &"width".into(), &width_of().into());
                        let _ = js_sys::Reflect::set(&size, &"height".into(), &height.into());
                        call(&p.js, "setSize", &[size.into()]);
                    }
                });
            })
            .into_js_value();
            let Ok(ctor) = js_sys::Reflect::get(&js_sys::global(), &"ResizeObserver".into()) else {
                return;
            };
            let Ok(ctor) = ctor.dyn_into::<js_sys::Function>() else {
                return;
            };
            let args: js_sys::Array = std::iter::once(resize).collect();
            if let Ok(obs) = js_sys::Reflect::construct(&ctor, &args) {
                let el: JsValue = el.into();
                call(&obs, "observe", &[el]);
                observer.set_value(Some(obs));
            }
        });
        on_cleanup(move || {
            observer.update_value(|o| {
                if let Some(o) = o.take() {
                    call(&o, "disconnect", &[]);
                }
            });
            plot.update_value(|p| {
                if let Some(p) = p.take() {
                    call(&p.js, "destroy", &[]);
                }
            });
        });
    }

    view! {
        <div class="chart" id=id data-testid="chart">
            <div class="chart-canvas" node_ref=node></div>
            {move || {
                (!data.with(ChartData::has_values))
                    .then(|| view! { <p class="chart-empty muted">{format!("{title}: no data yet")}</p> })
            }}
        </div>
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn points_align_on_the_union_of_x() {
        let d = ChartData::from_points(vec![
            (
                "train".into(),
                "red".into(),
                false,
                vec![(1.0, 3.0), (2.0, 2.5), (3.0, 2.0)],
            ),
            (
                "eval".into(),
                "blue".into(),
                true,
                vec![(0.0, 3.2), (3.0, 2.1)],
            ),
        ]);
        assert_eq!(d.x, vec![0.0, 1.0, 2.0, 3.0]);
        assert_eq!(
            d.series[0].values,
            vec![None, Some(3.0), Some(2.5), Some(2.0)]
        );
        assert_eq!(d.series[1].values, vec![Some(3.2), None, None, Some(2.1)]);
        assert!(d.has_values());
        assert!(!ChartData::default().has_values());
    }

    #[test]
    fn tick_labels_keep_small_rates_readable() {
        assert_eq!(tick_label(2e-4), "2.0e-4");
        assert_eq!(tick_label(0.0), "0");
        assert_eq!(tick_label(2.25), "2.25");
        assert_eq!(tick_label(4.0), "4");
        assert_eq!(tick_label(184.4), "184");
    }

    #[test]
    fn non_finite_values_become_gaps() {
        let d = ChartData::from_points(vec![(
            "loss".into(),
            "red".into(),
            false,
            vec![(1.0, f64::NAN), (2.0, 1.0)],
        )]);
        assert_eq!(d.series[0].values, vec![None, Some(1.0)]);
    }
}
