//! Training examples: a chat rendered through the model's own chat template (or a plain text),
//! tokenized, with the positions the loss is taken on.
//!
//! Masking follows transformers/TRL practice as `shared/reference/QUALITY.md` states it: with
//! [`LossOn::Assistant`] the targets of an assistant turn are its content and its end-of-turn
//! token (e.g. `<|im_end|>`), inclusive; whatever the template adds after the end-of-turn token
//! (`\n`) stays in the input but is not a target. `targets[t]` says whether token `t` is scored;
//! with the causal shift, the logits at `t - 1` predict it (so token 0 is never scored).

use crate::chat_template::{ChatTemplate, Message};
use crate::tokenizer::Tok;
use crate::{Error, Result};

/// Which tokens the loss is taken on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LossOn {
    /// The assistant turns only (content and end-of-turn token): the default for chat data.
    #[default]
    Assistant,
    /// Every token (after the first).
    All,
}

/// How rows become examples.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RenderOptions {
    pub loss_on: LossOn,
    /// Longer examples are cut to this many tokens (the tail is dropped).
    pub max_len: usize,
}

impl Default for RenderOptions {
    fn default() -> Self {
        RenderOptions {
            loss_on: LossOn::Assistant,
            max_len: 1024,
        }
    }
}

/// One tokenized example.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    pub ids: Vec<u32>,
    /// `targets[t]`: token `t` is predicted from the tokens before it and counted in the loss.
    pub targets: Vec<bool>,
    /// Token count before truncation.
    pub full_len: usize,
    pub truncated: bool,
}

impl Example {
    /// Number of scored tokens. Nothing precedes the first token, so it is never scored even
    /// when flagged (a packed document's first token is scored where it follows another).
    pub fn n_targets(&self) -> usize {
        self.targets.iter().skip(1).filter(|&&t| t).count()
    }

    fn from_parts(mut ids: Vec<u32>, mut targets: Vec<bool>, max_len: usize) -> Example {
        let full_len = ids.len();
        let truncated = full_len > max_len;
        if truncated {
            ids.truncate(max_len);
            targets.truncate(max_len);
        }
        Example {
            ids,
            targets,
            full_len,
            truncated,
        }
    }
}

/// Renders a conversation through `tmpl`, tokenizes it (no special tokens added: the template
/// writes them, as `apply_chat_template` does) and marks the targets.
pub fn render_chat(
    tok: &Tok,
    tmpl: &ChatTemplate,
    messages: &[Message],
    o: &RenderOptions,
) -> Result<Example> {
    if messages.is_empty() {
        return Err(Error::InvalidParams(
            "a chat example needs at least one message".into(),
        ));
    }
    if o.max_len < 2 {
        return Err(Error::InvalidParams(format!(
            "max length {} is too short for training (at least 2 tokens)",
            o.max_len
        )));
    }
    let full_text = tmpl.render(messages, false)?;
    let ids = tok.encode(&full_text, false)?;
    let mut targets = vec![o.loss_on == LossOn::All; ids.len()];
    if o.loss_on == LossOn::Assistant {
        let eos = tok.eos_token_ids();
        for (i, m) in messages.iter().enumerate() {
            if m.role != "assistant" {
                continue;
            }
            // Start: the conversation before this turn with the assistant header opened.
            let start = token_prefix_len(tok, &tmpl.render(&messages[..i], true)?, &ids)?;
            // End: the conversation through this turn.
            let end = token_prefix_len(tok, &tmpl.render(&messages[..=i], false)?, &ids)?;
            let end = end.min(ids.len());
            if start >= end {
                continue;
            }
            // Drop what follows the turn's end-of-turn token (the template's "\n").
            let stop = (start..end)
                .rev()
                .find(|&t| eos.contains(&ids[t]))
                .map_or(end, |t| t + 1);
            for t in targets.iter_mut().take(stop).skip(start) {
                *t = true;
            }
        }
    }
    Ok(Example::from_parts(ids, targets, o.max_len))
}

/// A plain-text document for continued pre-training: every token is a target, and an
/// end-of-text token closes the document when the tokenizer has one.
pub fn render_text(tok: &Tok, text: &str, o: &RenderOptions) -> Result<Example> {
    if o.max_len < 2 {
        return Err(Error::InvalidParams(format!(
            "max length {} is too short for training (at least 2 tokens)",
            o.max_len
        )));
    }
    let mut ids = tok.encode(text, false)?;
    if let Some(eot) = end_of_text_id(tok) {
        ids.push(eot);
    }
    let targets = vec![true; ids.len()];
    Ok(Example::from_parts(ids, targets, o.max_len))
}

/// The token that separates documents: `<|endoftext|>` (or `</s>`) when the vocabulary has it,
/// else the first end-of-sequence id.
pub fn end_of_text_id(tok: &Tok) -> Option<u32> {
    ["<|endoftext|>", "</s>", "<|end_of_text|>"]
        .iter()
        .find_map(|t| tok.token_to_id(t))
        .or_else(|| tok.eos_token_ids().first().copied())
}

/// How many leading tokens of `full` the rendering `prefix_text` covers. Tokenizing the prefix
/// alone normally gives a prefix of the full ids; where a merge crosses the boundary, the common
/// prefix is used.
fn token_prefix_len(tok: &Tok, prefix_text: &str, full: &[u32]) -> Result<usize> {
    let p = tok.encode(prefix_text, false)?;
    let common = p.iter().zip(full).take_while(|(a, b)| a == b).count();
    Ok(if common == p.len() { p.len() } else { common })
}

/// Concatenates examples into blocks of exactly `block` tokens (the last partial block is
/// dropped), keeping each token's target flag. The reference's packing for continued
/// pre-training on text (`shared/reference/README.md`).
pub fn pack(examples: &[Example], block: usize) -> Vec<Example> {
    pack_blocks(examples, block, false)
}

/// As [`pack`], keeping the last partial block too, so no token of the data is dropped: a
/// run's optional packing (rows share a block and attend across their boundary, the usual
/// trade for no padding).
pub fn pack_all(examples: &[Example], block: usize) -> Vec<Example> {
    pack_blocks(examples, block, true)
}

/// How many examples [`pack_all`] makes of rows with these token counts.
pub fn packed_count(lengths: impl IntoIterator<Item = u64>, block: usize) -> u64 {
    lengths
        .into_iter()
        .sum::<u64>()
        .div_ceil(block.max(1) as u64)
}

fn pack_blocks(examples: &[Example], block: usize, keep_tail: bool) -> Vec<Example> {
    let block = block.max(1);
    let mut out = Vec::new();
    let mut ids = Vec::with_capacity(block);
    let mut targets = Vec::with_capacity(block);
    for e in examples {
        for (&id, &t) in e.ids.iter().zip(&e.targets) {
            ids.push(id);
            targets.push(t);
            if ids.len() == block {
                out.push(Example::from_parts(
                    std::mem::take(&mut ids),
                    std::mem::take(&mut targets),
                    block,
                ));
            }
        }
    }
    if keep_tail && !ids.is_empty() {
        let n = ids.len();
        out.push(Example::from_parts(ids, targets, n));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(ids: &[u32], targets: &[bool]) -> Example {
        Example::from_parts(ids.to_vec(), targets.to_vec(), usize::MAX)
    }

    #[test]
    fn packing_cuts_blocks_keeps_flags_and_the_tail_on_request() {
        let rows = [
            ex(&[1, 2, 3], &[false, true, true]),
            ex(&[4, 5, 6, 7, 8], &[false, false, true, true, true]),
        ];
        let dropped = pack(&rows, 3);
        assert_eq!(dropped.len(), 2);
        assert_eq!(dropped[1].ids, [4, 5, 6]);
        assert_eq!(dropped[1].targets, [false, false, true]);
        let all = pack_all(&rows, 3);
        assert_eq!(all.len(), 3);
        assert_eq!(all[2].ids, [7, 8]);
        assert_eq!(all[2].targets, [true, true]);
        assert!(all.iter().all(|e| !e.truncated));
        assert_eq!(packed_count([3, 5], 3), 3);
        assert_eq!(packed_count([3, 3], 3), 2);
        assert_eq!(packed_count([], 3), 0);
    }
}
