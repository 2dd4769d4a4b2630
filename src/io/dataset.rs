//! JSONL datasets: one example per line, in one of these shapes:
//! `{"text": ...}`, `{"prompt": ..., "completion": ...}`,
//! `{"messages": [{"role": ..., "content": ...}, ...]}` (rendered with the chat template), and
//! two common in published datasets, read as chats: ShareGPT's
//! `{"conversations": [{"from": "human"|"gpt"|"system", "value": ...}, ...]}` and Alpaca's
//! `{"instruction": ..., "input": ..., "output": ...}` (the user turn is the instruction and,
//! when not empty, a newline and the input, as LLaMA-Factory joins them; an optional `system`).
//! Bad lines (invalid JSON, missing or empty fields) are reported with their line number; the
//! caller decides whether to skip them or fail.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::io::read_text;
use crate::io::tokenizer::{Message, Tokenizer};
use crate::{Error, Result};

#[derive(Clone, Debug, PartialEq)]
pub enum Example {
    Text(String),
    PromptCompletion { prompt: String, completion: String },
    Chat(Vec<Message>),
}

/// A line that could not be used, and why.
#[derive(Clone, Debug, PartialEq)]
pub struct BadLine {
    pub line: usize,
    pub reason: String,
}

/// Examples in file order with their 1-based line numbers, and the bad lines.
pub struct Dataset {
    pub path: PathBuf,
    pub examples: Vec<(usize, Example)>,
    pub bad_lines: Vec<BadLine>,
}

fn parse_line(line: &str) -> std::result::Result<Example, String> {
    let v: Value = serde_json::from_str(line).map_err(|e| format!("invalid JSON: {e}"))?;
    let obj = v.as_object().ok_or("expected a JSON object")?;
    let text_field = |k: &str| -> std::result::Result<String, String> {
        match obj.get(k) {
            Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
            Some(Value::String(_)) => Err(format!("field `{k}` is empty")),
            Some(_) => Err(format!("field `{k}` must be a string")),
            None => Err(format!("missing field `{k}`")),
        }
    };
    if obj.contains_key("messages") {
        let msgs = obj["messages"].as_array().ok_or("field `messages` must be a list")?;
        if msgs.is_empty() {
            return Err("field `messages` is empty".into());
        }
        let msgs: Vec<Message> = msgs
            .iter()
            .enumerate()
            .map(|(i, m)| serde_json::from_value(m.clone()).map_err(|e| format!("messages[{i}]: {e}")))
            .collect::<std::result::Result<_, _>>()?;
        Ok(Example::Chat(msgs))
    } else if obj.contains_key("conversations") {
        let turns = obj["conversations"].as_array().ok_or("field `conversations` must be a list")?;
        if turns.is_empty() {
            return Err("field `conversations` is empty".into());
        }
        let mut msgs = system_message(obj)?;
        for (i, t) in turns.iter().enumerate() {
            let field = |k: &str| t.get(k).and_then(Value::as_str).ok_or_else(|| format!("conversations[{i}]: missing or non-string `{k}`"));
            let role = match field("from")? {
                "human" | "user" => "user",
                "gpt" | "assistant" | "model" => "assistant",
                "system" => "system",
                other => return Err(format!("conversations[{i}]: `from` is `{other}` (human, gpt, system, user, assistant or model are read)")),
            };
            msgs.push(Message { role: role.into(), content: field("value")?.to_string() });
        }
        Ok(Example::Chat(msgs))
    } else if obj.contains_key("instruction") {
        let mut user = text_field("instruction")?;
        match obj.get("input") {
            None | Some(Value::Null) => {}
            Some(Value::String(input)) if input.is_empty() => {}
            Some(Value::String(input)) => user = format!("{user}\n{input}"),
            Some(_) => return Err("field `input` must be a string".into()),
        }
        let mut msgs = system_message(obj)?;
        msgs.push(Message { role: "user".into(), content: user });
        msgs.push(Message { role: "assistant".into(), content: text_field("output")? });
        Ok(Example::Chat(msgs))
    } else if obj.contains_key("prompt") || obj.contains_key("completion") {
        Ok(Example::PromptCompletion { prompt: text_field("prompt")?, completion: text_field("completion")? })
    } else if obj.contains_key("text") {
        Ok(Example::Text(text_field("text")?))
    } else {
        Err("expected a `text`, `prompt`/`completion`, `messages`, `conversations` or `instruction`/`output` field".into())
    }
}

/// The optional top-level `system` of a ShareGPT or Alpaca line, as a first message.
fn system_message(obj: &serde_json::Map<String, Value>) -> std::result::Result<Vec<Message>, String> {
    match obj.get("system") {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) if s.is_empty() => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![Message { role: "system".into(), content: s.clone() }]),
        Some(_) => Err("field `system` must be a string".into()),
    }
}

impl Dataset {
    /// Reads a JSONL file. Blank lines are ignored; other bad lines are collected.
    pub fn read(path: &Path) -> Result<Self> {
        let text = read_text(path)?;
        let mut examples = Vec::new();
        let mut bad_lines = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            match parse_line(line) {
                Ok(e) => examples.push((i + 1, e)),
                Err(reason) => bad_lines.push(BadLine { line: i + 1, reason }),
            }
        }
        Ok(Dataset { path: path.to_path_buf(), examples, bad_lines })
    }

    /// An error naming the first bad line, for `--strict`.
    pub fn strict(&self) -> Result<()> {
        match self.bad_lines.first() {
            Some(b) => Err(Error::file(&self.path, format!("line {}: {} ({} bad line(s) in all)", b.line, b.reason, self.bad_lines.len()))),
            None => Ok(()),
        }
    }
}

/// Token ids of an example and, per token, whether it is a training target: completion or
/// assistant tokens only unless `train_on_prompt` (plain text: every token).
pub fn tokenize(tok: &Tokenizer, ex: &Example, train_on_prompt: bool) -> Result<(Vec<u32>, Vec<bool>)> {
    match ex {
        Example::Text(t) => {
            let ids = tok.encode(t, true)?;
            let mask = vec![true; ids.len()];
            Ok((ids, mask))
        }
        Example::PromptCompletion { prompt, completion } => {
            let p = tok.encode(prompt, true)?;
            let full = tok.encode(&format!("{prompt}{completion}"), true)?;
            // Tokens past the prompt's own tokenization are the completion's (BPE merges across
            // the boundary are rare and count as completion).
            let split = common_prefix(&p, &full);
            let mask = (0..full.len()).map(|i| train_on_prompt || i >= split).collect();
            Ok((full, mask))
        }
        Example::Chat(msgs) => {
            let text = tok.apply_chat_template(msgs, false)?;
            let ids = tok.encode(&text, false)?;
            if train_on_prompt {
                let n = ids.len();
                return Ok((ids, vec![true; n]));
            }
            // A token is an assistant token when it lies past the rendering of the
            // conversation up to (not including) an assistant message plus the generation
            // prompt, and within that message's rendering.
            let mut mask = vec![false; ids.len()];
            for (i, m) in msgs.iter().enumerate() {
                if m.role != "assistant" {
                    continue;
                }
                let before = tok.encode(&tok.apply_chat_template(&msgs[..i], true)?, false)?;
                let through = tok.encode(&tok.apply_chat_template(&msgs[..=i], false)?, false)?;
                let (lo, hi) = (common_prefix(&before, &ids), common_prefix(&through, &ids));
                for m in mask.iter_mut().take(hi).skip(lo) {
                    *m = true;
                }
            }
            Ok((ids, mask))
        }
    }
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}
