//! Markdown to HTML for model answers. Raw HTML in the text is shown as text,
//! never interpreted, so an answer cannot inject markup into the window.

use pulldown_cmark::{html, Event, Options, Parser};

/// Renders `text` (CommonMark with tables, strikethrough and task lists) to HTML.
pub fn to_html(text: &str) -> String {
    let mut options = Options::empty();
    options.insert(Options::ENABLE_TABLES);
    options.insert(Options::ENABLE_STRIKETHROUGH);
    options.insert(Options::ENABLE_TASKLISTS);
    let parser = Parser::new_ext(text, options).map(|event| match event {
        Event::Html(raw) | Event::InlineHtml(raw) => Event::Text(raw),
        other => other,
    });
    let mut out = String::with_capacity(text.len() * 3 / 2);
    html::push_html(&mut out, parser);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_blocks_and_emphasis_render() {
        let html = to_html("Use **this**:\n\n```rust\nfn main() {}\n```\n");
        assert!(html.contains("<strong>this</strong>"), "{html}");
        assert!(
            html.contains("<pre><code class=\"language-rust\">fn main() {}"),
            "{html}"
        );
    }

    #[test]
    fn raw_html_is_escaped() {
        let html = to_html("hi <script>alert(1)</script> <b>x</b>");
        assert!(!html.contains("<script>"), "{html}");
        assert!(html.contains("&lt;script&gt;"), "{html}");
        assert!(!html.contains("<b>"), "{html}");
    }
}
