//! JSONL shapes and which tokens are training targets.

mod common;

use std::path::Path;

use tuna::io::dataset::{tokenize, Dataset, Example};
use tuna::io::tokenizer::{Message, Tokenizer};

use common::Scratch;

fn tok() -> Tokenizer {
    Tokenizer::from_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/fixtures/llama-gqa")).unwrap()
}

#[test]
fn prompt_completion_targets_only_the_completion() {
    let t = tok();
    let ex = Example::PromptCompletion { prompt: "What is two plus two?".into(), completion: " Four.".into() };
    let (ids, mask) = tokenize(&t, &ex, false).unwrap();
    let prompt_len = t.encode("What is two plus two?", true).unwrap().len();
    assert!(mask[..prompt_len].iter().all(|m| !m) && mask[prompt_len..].iter().all(|&m| m), "{mask:?}");
    assert_eq!(t.decode(&ids[prompt_len..], true).unwrap(), " Four.");
    let (_, all) = tokenize(&t, &ex, true).unwrap();
    assert!(all.iter().all(|&m| m));
}

#[test]
fn chat_targets_only_assistant_turns() {
    let t = tok();
    let msgs = vec![
        Message { role: "user".into(), content: "Hi there".into() },
        Message { role: "assistant".into(), content: "Hello friend".into() },
        Message { role: "user".into(), content: "Bye".into() },
        Message { role: "assistant".into(), content: "Goodbye".into() },
    ];
    let (ids, mask) = tokenize(&t, &Example::Chat(msgs), false).unwrap();
    let targets: Vec<u32> = ids.iter().zip(&mask).filter(|(_, &m)| m).map(|(&i, _)| i).collect();
    // The assistant contents and the end-of-turn token after each: nothing of the user turns.
    let text = t.decode(&targets, false).unwrap();
    assert_eq!(text, "Hello friend<|end_of_text|>Goodbye<|end_of_text|>");
}

#[test]
fn bad_lines_are_reported_with_their_numbers() {
    let scratch = Scratch::new("ds");
    let path = scratch.join("data.jsonl");
    std::fs::write(
        &path,
        "{\"text\": \"ok\"}\n\n[1, 2]\n{\"prompt\": \"p\", \"completion\": \"\"}\n{\"messages\": []}\n{\"other\": 1}\n{\"messages\": [{\"role\": \"user\"}]}\n{\"prompt\": \"p\", \"completion\": \"c\"}\n",
    )
    .unwrap();
    let d = Dataset::read(&path).unwrap();
    assert_eq!(d.examples.iter().map(|(l, _)| *l).collect::<Vec<_>>(), vec![1, 8]);
    let bad: Vec<(usize, &str)> = d.bad_lines.iter().map(|b| (b.line, b.reason.as_str())).collect();
    assert_eq!(bad.len(), 5, "{bad:?}");
    assert_eq!(bad[0], (3, "expected a JSON object"));
    assert_eq!(bad[1], (4, "field `completion` is empty"));
    assert_eq!(bad[2], (5, "field `messages` is empty"));
    assert!(bad[3].1.contains("expected a `text`"));
    assert!(bad[4].0 == 7 && bad[4].1.contains("messages[0]") && bad[4].1.contains("content"), "{:?}", bad[4]);
    let e = d.strict().unwrap_err().to_string();
    assert!(e.contains("line 3") && e.contains("5 bad line(s)"), "{e}");
}
