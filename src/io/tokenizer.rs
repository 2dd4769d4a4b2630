//! Tokenizer (`tokenizer.json`, through the `tokenizers` crate) with the special tokens and
//! chat template of `tokenizer_config.json` (or a `chat_template.jinja` file, as transformers 5
//! saves it). Chat templates render with minijinja the way transformers renders them: Python
//! string methods (`pycompat`), `raise_exception`, `strftime_now`, and the `bos_token`,
//! `eos_token`, `messages` and `add_generation_prompt` variables.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::io::{read_json, read_text};
use crate::{Error, Result};

/// One chat message.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    chat_template: Option<String>,
}

/// A special token in tokenizer_config.json: a string or `{"content": ...}`.
fn token_text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

impl Tokenizer {
    /// Loads `dir/tokenizer.json` and, when present, `dir/tokenizer_config.json` and
    /// `dir/chat_template.jinja`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(Error::file(&path, "missing tokenizer (tuna needs the fast tokenizer's tokenizer.json)"));
        }
        let inner = tokenizers::Tokenizer::from_file(&path).map_err(|e| Error::file(&path, format!("cannot load tokenizer: {e}")))?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg = if cfg_path.exists() { Some(read_json(&cfg_path)?) } else { None };
        let field = |k: &str| cfg.as_ref().and_then(|c| c.get(k));
        let mut chat_template = match field("chat_template") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            // A list of named templates: take "default".
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template").and_then(Value::as_str))
                .map(str::to_string),
            Some(_) => return Err(Error::file(&cfg_path, "field `chat_template` must be a string or a list of {name, template}")),
        };
        let jinja = dir.join("chat_template.jinja");
        if chat_template.is_none() && jinja.exists() {
            chat_template = Some(read_text(&jinja)?);
        }
        Ok(Tokenizer { inner, path, bos_token: token_text(field("bos_token")), eos_token: token_text(field("eos_token")), chat_template })
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Token ids of `text`; `add_special_tokens` applies the tokenizer's post-processor (a BOS,
    /// for Llama tokenizers).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, add_special_tokens).map_err(|e| Error::file(&self.path, format!("encoding failed: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner.decode(ids, skip_special_tokens).map_err(|e| Error::file(&self.path, format!("decoding failed: {e}")))
    }

    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }

    /// Renders the chat template for `messages`, as transformers' `apply_chat_template(...,
    /// tokenize=False)` does.
    pub fn apply_chat_template(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let tpl = self
            .chat_template
            .as_deref()
            .ok_or_else(|| Error::file(self.path.with_file_name("tokenizer_config.json"), "no `chat_template` (and no chat_template.jinja)"))?;
        render_chat_template(tpl, messages, add_generation_prompt, self.bos_token.as_deref(), self.eos_token.as_deref())
            .map_err(|e| Error::file(self.path.with_file_name("tokenizer_config.json"), format!("chat template: {e}")))
    }
}

/// Renders a Hugging Face chat template. Errors carry minijinja's message (with the template
/// line) or the template's own `raise_exception` text.
pub fn render_chat_template(
    template: &str,
    messages: &[Message],
    add_generation_prompt: bool,
    bos_token: Option<&str>,
    eos_token: Option<&str>,
) -> std::result::Result<String, String> {
    let mut env = minijinja::Environment::new();
    // Python-like string and dict methods (.strip(), .startswith(), .items(), ...).
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    // transformers trims block whitespace the same way.
    let syntax = minijinja::syntax::SyntaxConfig::builder().trim_blocks(true).lstrip_blocks(true).build().map_err(|e| e.to_string())?;
    env.set_syntax(syntax);
    env.add_function("raise_exception", |msg: String| -> std::result::Result<String, minijinja::Error> {
        Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
    });
    env.add_function("strftime_now", |fmt: String| -> String { strftime_now(&fmt) });
    env.add_template("chat", template).map_err(|e| e.to_string())?;
    let ctx = minijinja::context! {
        messages => minijinja::Value::from(minijinja::value::Serde(messages)),
        add_generation_prompt => add_generation_prompt,
        bos_token => bos_token.unwrap_or(""),
        eos_token => eos_token.unwrap_or(""),
    };
    let tpl = env.get_template("chat").map_err(|e| e.to_string())?;
    tpl.render(ctx).map_err(|e| {
        let mut msg = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            msg.push_str(&format!(": {s}"));
            src = s.source();
        }
        msg
    })
}

/// The few `strftime` codes chat templates use for today's date (UTC): %d %m %Y %b %B %y.
fn strftime_now(fmt: &str) -> String {
    let days = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() / 86400).unwrap_or(0) as i64;
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    const MONTHS: [&str; 12] = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November", "December"];
    let name = MONTHS[(m - 1) as usize];
    fmt.replace("%d", &format!("{d:02}"))
        .replace("%m", &format!("{m:02}"))
        .replace("%Y", &y.to_string())
        .replace("%y", &format!("{:02}", y % 100))
        .replace("%B", name)
        .replace("%b", &name[..3])
}
