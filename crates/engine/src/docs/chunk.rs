//! Chunks by structure: a heading starts a new chunk (and names its section: the path of
//! headings above it, "Guide > Install"); paragraphs are gathered into a chunk while it
//! stays within `max_chars` characters (paragraphs joined by a blank line); a paragraph
//! longer than that is cut at sentence ends, else at spaces, else between characters.
//! A chunk records the pages it spans (PDF).

use super::extract::{Block, BlockKind};

/// The smallest and largest chunk size a user may ask for, in characters.
pub const MIN_CHUNK_CHARS: usize = 200;
pub const MAX_CHUNK_CHARS: usize = 20_000;

/// One chunk of a document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub text: String,
    /// "Title > Section", when a heading is above it.
    pub section: Option<String>,
    pub page_start: Option<u32>,
    pub page_end: Option<u32>,
}

struct Builder {
    max: usize,
    chunks: Vec<Chunk>,
    text: String,
    chars: usize,
    pages: Option<(u32, u32)>,
    section: Option<String>,
}

impl Builder {
    fn flush(&mut self) {
        if self.text.is_empty() {
            return;
        }
        self.chunks.push(Chunk {
            text: std::mem::take(&mut self.text),
            section: self.section.clone(),
            page_start: self.pages.map(|p| p.0),
            page_end: self.pages.map(|p| p.1),
        });
        self.chars = 0;
        self.pages = None;
    }

    fn add(&mut self, piece: &str, chars: usize, page: Option<u32>) {
        if !self.text.is_empty() && self.chars + 2 + chars > self.max {
            self.flush();
        }
        if !self.text.is_empty() {
            self.text.push_str("\n\n");
            self.chars += 2;
        }
        self.text.push_str(piece);
        self.chars += chars;
        if let Some(p) = page {
            self.pages = Some(match self.pages {
                Some((a, b)) => (a.min(p), b.max(p)),
                None => (p, p),
            });
        }
    }
}

/// Cuts `blocks` into chunks of at most `max_chars` characters (see the module docs).
pub fn chunk(blocks: &[Block], max_chars: usize) -> Vec<Chunk> {
    let max = max_chars.max(1);
    let mut b = Builder {
        max,
        chunks: Vec::new(),
        text: String::new(),
        chars: 0,
        pages: None,
        section: None,
    };
    let mut headings: Vec<(u8, String)> = Vec::new();
    for block in blocks {
        match block.kind {
            BlockKind::Heading(level) => {
                b.flush();
                headings.retain(|(l, _)| *l < level);
                headings.push((level, block.text.clone()));
                b.section = Some(
                    headings
                        .iter()
                        .map(|(_, t)| t.as_str())
                        .collect::<Vec<_>>()
                        .join(" > "),
                );
            }
            BlockKind::Paragraph => {
                let chars = block.text.chars().count();
                if chars <= max {
                    b.add(&block.text, chars, block.page);
                } else {
                    b.flush();
                    for piece in split_long(&block.text, max) {
                        let n = piece.chars().count();
                        b.add(&piece, n, block.page);
                    }
                }
            }
        }
    }
    b.flush();
    b.chunks
}

/// `text` (longer than `max` characters) in pieces of at most `max` characters: cut after
/// the last sentence end (". ", "? ", "! ") that fits, else at the last space, else at
/// `max` characters.
fn split_long(text: &str, max: usize) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text.trim();
    while rest.chars().count() > max {
        // Byte offset just past `max` characters.
        let limit = rest.char_indices().nth(max).map_or(rest.len(), |(i, _)| i);
        let window = &rest[..limit];
        let sentence = [". ", "? ", "! ", ".\n", "?\n", "!\n"]
            .iter()
            .filter_map(|p| window.rfind(p).map(|i| i + 1))
            .max()
            .filter(|&i| i > limit / 4);
        let cut = sentence
            .or_else(|| window.rfind(char::is_whitespace).filter(|&i| i > 0))
            .unwrap_or(limit);
        let (head, tail) = rest.split_at(cut);
        let head = head.trim();
        if !head.is_empty() {
            out.push(head.to_string());
        }
        rest = tail.trim_start();
    }
    if !rest.is_empty() {
        out.push(rest.to_string());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn para(t: &str, page: Option<u32>) -> Block {
        Block {
            kind: BlockKind::Paragraph,
            text: t.to_string(),
            page,
        }
    }

    fn head(level: u8, t: &str) -> Block {
        Block {
            kind: BlockKind::Heading(level),
            text: t.to_string(),
            page: None,
        }
    }

    #[test]
    fn headings_start_chunks_and_name_sections() {
        let blocks = [
            para("Preamble.", None),
            head(1, "Guide"),
            para("Intro one.", None),
            para("Intro two.", None),
            head(2, "Install"),
            para("Run the installer.", None),
            head(2, "Use"),
            para("Open the app.", None),
            head(1, "Appendix"),
            para("More.", None),
        ];
        let c = chunk(&blocks, 1000);
        let got: Vec<(Option<&str>, &str)> = c
            .iter()
            .map(|c| (c.section.as_deref(), c.text.as_str()))
            .collect();
        assert_eq!(
            got,
            vec![
                (None, "Preamble."),
                (Some("Guide"), "Intro one.\n\nIntro two."),
                (Some("Guide > Install"), "Run the installer."),
                (Some("Guide > Use"), "Open the app."),
                (Some("Appendix"), "More."),
            ]
        );
    }

    #[test]
    fn paragraphs_gather_up_to_the_size_and_pages_are_kept() {
        let p = "x".repeat(40);
        let blocks = [
            para(&p, Some(1)),
            para(&p, Some(1)),
            para(&p, Some(2)),
            para(&p, Some(3)),
        ];
        // 40 + 2 + 40 = 82 fits in 90; a third would not.
        let c = chunk(&blocks, 90);
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].text, format!("{p}\n\n{p}"));
        assert_eq!((c[0].page_start, c[0].page_end), (Some(1), Some(1)));
        assert_eq!((c[1].page_start, c[1].page_end), (Some(2), Some(3)));
        for ch in &c {
            assert!(ch.text.chars().count() <= 90, "{}", ch.text.len());
        }
    }

    #[test]
    fn a_long_paragraph_is_cut_at_sentence_ends_then_spaces() {
        let text = "One sentence here. Another sentence here. A third one is here.";
        let c = chunk(&[para(text, None)], 30);
        let got: Vec<&str> = c.iter().map(|c| c.text.as_str()).collect();
        assert_eq!(
            got,
            vec![
                "One sentence here.",
                "Another sentence here.",
                "A third one is here."
            ]
        );
        // No sentence end: cut at spaces; no space: cut between characters (multi-byte safe).
        let words = "alpha beta gamma delta epsilon";
        let c = chunk(&[para(words, None)], 12);
        assert!(c.iter().all(|c| c.text.chars().count() <= 12), "{c:?}");
        assert_eq!(
            c.iter()
                .map(|c| c.text.as_str())
                .collect::<Vec<_>>()
                .join(" "),
            words
        );
        let solid = "é".repeat(25);
        let c = chunk(&[para(&solid, None)], 10);
        assert_eq!(
            c.iter().map(|c| c.text.chars().count()).collect::<Vec<_>>(),
            vec![10, 10, 5]
        );
    }

    #[test]
    fn no_paragraphs_no_chunks() {
        assert!(chunk(&[head(1, "Only a title")], 100).is_empty());
        assert!(chunk(&[], 100).is_empty());
    }
}
