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

/// ShareGPT and Alpaca lines read as the chats they stand for (roles mapped, Alpaca's input
/// joined to its instruction by a newline, an optional system first), so they tokenize and
/// mask as those chats do; their bad lines are named.
#[test]
fn sharegpt_and_alpaca_lines_read_as_chats() {
    let dir = Scratch::new("dataset-formats");
    let path = dir.join("data.jsonl");
    let lines = [
        r#"{"conversations": [{"from": "human", "value": "Hi there"}, {"from": "gpt", "value": "Hello friend"}]}"#,
        r#"{"system": "Be brief.", "conversations": [{"from": "human", "value": "Bye"}, {"from": "gpt", "value": "Goodbye"}]}"#,
        r#"{"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}"#,
        r#"{"instruction": "Say hi.", "input": "", "output": "Hi."}"#,
        r#"{"conversations": [{"from": "tool", "value": "x"}]}"#,
        r#"{"instruction": "No output."}"#,
        r#"{"conversations": []}"#,
    ];
    std::fs::write(&path, lines.join("\n")).unwrap();
    let d = Dataset::read(&path).unwrap();
    let m = |role: &str, content: &str| Message { role: role.into(), content: content.into() };
    let want = [
        vec![m("user", "Hi there"), m("assistant", "Hello friend")],
        vec![m("system", "Be brief."), m("user", "Bye"), m("assistant", "Goodbye")],
        vec![m("user", "Add the numbers.\n2 and 3"), m("assistant", "5")],
        vec![m("user", "Say hi."), m("assistant", "Hi.")],
    ];
    assert_eq!(d.examples.len(), want.len());
    let t = tok();
    for ((line, ex), msgs) in d.examples.iter().zip(want) {
        let chat = Example::Chat(msgs);
        assert_eq!(ex, &chat, "line {line}");
        assert_eq!(tokenize(&t, ex, false).unwrap(), tokenize(&t, &chat, false).unwrap(), "line {line}");
    }
    let reasons: Vec<(usize, &str)> = d.bad_lines.iter().map(|b| (b.line, b.reason.as_str())).collect();
    assert_eq!(reasons.len(), 3, "{reasons:?}");
    assert!(reasons[0].0 == 5 && reasons[0].1.contains("`from` is `tool`"), "{reasons:?}");
    assert!(reasons[1].0 == 6 && reasons[1].1.contains("missing field `output`"), "{reasons:?}");
    assert!(reasons[2].0 == 7 && reasons[2].1.contains("`conversations` is empty"), "{reasons:?}");
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
