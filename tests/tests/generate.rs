//! Generate, Tokenize and Detokenize on the real SmolLM2 GGUF through llama.cpp.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use modeld_e2e::{Agent, Assets, Client, SMOLLM2_SHA256, SMOLLM2_SIZE, pb, reason};
use tokio_stream::StreamExt;
use tonic::Code;

async fn agent_with_smol() -> (Agent, Client) {
    let assets = Assets::get();
    let agent = Agent::start().await;
    let client = agent.client().await;
    let spec = pb::ModelSpec {
        id: "smol".into(),
        format: pb::ModelFormat::Gguf as i32,
        files: vec![pb::ModelFile {
            name: "smol.gguf".into(),
            urls: vec![format!("file://{}", assets.gguf.display())],
            sha256: SMOLLM2_SHA256.into(),
            size_bytes: SMOLLM2_SIZE,
            ..Default::default()
        }],
        ..Default::default()
    };
    client.register_model(spec).await.unwrap();
    client.pull_to_end("smol").await.unwrap();
    (agent, client)
}

fn chat(text: &str) -> Option<pb::generate_request::Input> {
    Some(pb::generate_request::Input::Chat(pb::ChatMessages {
        messages: vec![pb::ChatMessage {
            role: pb::ChatRole::User as i32,
            content: text.into(),
        }],
    }))
}

fn greedy() -> Option<pb::SamplingParams> {
    Some(pb::SamplingParams {
        temperature: Some(0.0),
        ..Default::default()
    })
}

/// Runs a generation to the end: (text, token count, summary).
async fn run(
    client: &Client,
    request: pb::GenerateRequest,
) -> (String, usize, pb::GenerateSummary) {
    let mut stream = client
        .generate()
        .generate(request)
        .await
        .unwrap()
        .into_inner();
    let mut text = String::new();
    let mut tokens = 0;
    while let Some(msg) = stream.next().await {
        match msg.unwrap().event.unwrap() {
            pb::generate_response::Event::Token(t) => {
                text.push_str(&t.text);
                tokens += 1;
            }
            pb::generate_response::Event::Summary(s) => return (text, tokens, s),
        }
    }
    panic!("the stream ended without a summary");
}

#[tokio::test]
async fn greedy_chat_streams_tokens_then_a_summary_and_repeats_exactly() {
    let (_agent, client) = agent_with_smol().await;
    let request = pb::GenerateRequest {
        model_id: "smol".into(),
        input: chat("What is the capital of France?"),
        sampling: greedy(),
        max_tokens: 24,
        ..Default::default()
    };
    let (text, tokens, summary) = run(&client, request.clone()).await;
    assert!(!text.trim().is_empty());
    assert!(text.contains("Paris"), "{text:?}");
    let usage = summary.usage.unwrap();
    assert_eq!(usage.generated_tokens as usize, tokens);
    assert!(
        usage.prompt_tokens > 10,
        "the chat template wraps the question"
    );
    assert!(usage.time_to_first_token_seconds > 0.0);
    assert!(matches!(
        summary.finish_reason(),
        pb::FinishReason::Stop | pb::FinishReason::Length
    ));
    let (again, _, _) = run(&client, request).await;
    assert_eq!(text, again, "greedy decoding must be deterministic");
}

#[tokio::test]
async fn max_tokens_and_stop_strings_end_generation() {
    let (_agent, client) = agent_with_smol().await;
    let base = pb::GenerateRequest {
        model_id: "smol".into(),
        input: chat("Count from one to twenty in words, separated by commas."),
        sampling: greedy(),
        max_tokens: 40,
        ..Default::default()
    };
    let (full, _, _) = run(&client, base.clone()).await;
    let (_, tokens, summary) = run(
        &client,
        pb::GenerateRequest {
            max_tokens: 3,
            ..base.clone()
        },
    )
    .await;
    assert_eq!(tokens, 3);
    assert_eq!(summary.finish_reason(), pb::FinishReason::Length);

    // A stop string from the middle of the greedy output: everything before it comes
    // out, nothing of it does.
    let chars: Vec<char> = full.chars().collect();
    assert!(chars.len() > 12, "{full:?}");
    let stop: String = chars[8..12].iter().collect();
    let at = full.find(&stop).unwrap();
    let (stopped, _, summary) = run(
        &client,
        pb::GenerateRequest {
            stop: vec![stop.clone()],
            ..base
        },
    )
    .await;
    assert_eq!(summary.finish_reason(), pb::FinishReason::Stop);
    assert_eq!(stopped, full[..at], "stop {stop:?}");
}

#[tokio::test]
async fn tokenize_and_detokenize_round_trip() {
    let (_agent, client) = agent_with_smol().await;
    let mut g = client.generate();
    let text = "Hello, world! Numbers 12345, CJK 日本語, emoji 🙂, tabs\tand\r\nCRLF.";
    let t = g
        .tokenize(pb::TokenizeRequest {
            model_id: "smol".into(),
            text: text.into(),
            add_special_tokens: false,
            parse_special: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(t.token_ids.len() > 10);
    assert_eq!(t.pieces.len(), t.token_ids.len());
    let back = g
        .detokenize(pb::DetokenizeRequest {
            model_id: "smol".into(),
            token_ids: t.token_ids.clone(),
            skip_special_tokens: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(back.text, text);
    let special = g
        .tokenize(pb::TokenizeRequest {
            model_id: "smol".into(),
            text: "<|im_start|>".into(),
            add_special_tokens: false,
            parse_special: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        special.token_ids.len(),
        1,
        "a control token parses as one token"
    );
    let bad = g
        .detokenize(pb::DetokenizeRequest {
            model_id: "smol".into(),
            token_ids: vec![u32::MAX],
            skip_special_tokens: false,
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn bad_requests_are_refused_and_the_agent_keeps_serving() {
    let (_agent, client) = agent_with_smol().await;
    let mut g = client.generate();
    let base = pb::GenerateRequest {
        model_id: "smol".into(),
        input: chat("Hi"),
        max_tokens: 4,
        ..Default::default()
    };
    let missing = g
        .generate(pb::GenerateRequest {
            model_id: "nope".into(),
            ..base.clone()
        })
        .await
        .err()
        .unwrap();
    assert_eq!(missing.code(), Code::NotFound);
    let hot = g
        .generate(pb::GenerateRequest {
            sampling: Some(pb::SamplingParams {
                temperature: Some(99.0),
                ..Default::default()
            }),
            ..base.clone()
        })
        .await
        .err()
        .unwrap();
    assert_eq!(hot.code(), Code::InvalidArgument);
    assert!(hot.message().contains("sampling.temperature"));
    let no_input = g
        .generate(pb::GenerateRequest {
            input: None,
            ..base.clone()
        })
        .await
        .err()
        .unwrap();
    assert_eq!(no_input.code(), Code::InvalidArgument);

    // Registered but never fetched.
    let mut spec = client.get_model("smol").await.unwrap().spec.unwrap();
    spec.id = "not-here".into();
    spec.files[0].sha256 = "3".repeat(64);
    client.register_model(spec).await.unwrap();
    let absent = g
        .generate(pb::GenerateRequest {
            model_id: "not-here".into(),
            ..base.clone()
        })
        .await
        .err()
        .unwrap();
    assert_eq!(absent.code(), Code::FailedPrecondition);
    assert_eq!(reason(&absent), "MODEL_NOT_STORED");

    // A GGUF whose header lies never reaches llama.cpp.
    let assets = Assets::get();
    let broken = assets.fixtures.join("truncated.gguf");
    let bytes = std::fs::read(&broken).unwrap();
    use sha2::Digest;
    let spec = pb::ModelSpec {
        id: "broken".into(),
        format: pb::ModelFormat::Gguf as i32,
        files: vec![pb::ModelFile {
            name: "broken.gguf".into(),
            urls: vec![format!("file://{}", broken.display())],
            sha256: hex::encode(sha2::Sha256::digest(&bytes)),
            size_bytes: bytes.len() as u64,
            ..Default::default()
        }],
        ..Default::default()
    };
    client.register_model(spec).await.unwrap();
    client.pull_to_end("broken").await.unwrap();
    let invalid = g
        .generate(pb::GenerateRequest {
            model_id: "broken".into(),
            ..base.clone()
        })
        .await
        .err()
        .unwrap();
    assert_eq!(invalid.code(), Code::FailedPrecondition);
    assert_eq!(reason(&invalid), "MODEL_INVALID");

    let (text, _, _) = run(&client, base).await;
    assert!(!text.is_empty(), "the agent still serves");
}

#[tokio::test]
async fn a_full_queue_is_refused_at_once_and_a_dropped_stream_frees_the_worker() {
    let (_agent, client) = agent_with_smol().await;
    let long = pb::GenerateRequest {
        model_id: "smol".into(),
        input: chat("Write a long story about a lighthouse keeper."),
        sampling: greedy(),
        max_tokens: 400,
        ..Default::default()
    };
    // One runs, three wait: the fifth is refused without waiting.
    let mut streams = Vec::new();
    for _ in 0..4 {
        streams.push(
            client
                .generate()
                .generate(long.clone())
                .await
                .unwrap()
                .into_inner(),
        );
    }
    let refused = client
        .generate()
        .generate(long.clone())
        .await
        .err()
        .unwrap();
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert_eq!(reason(&refused), "MODEL_OVERLOADED");
    // Clients that go away stop their generations; the worker moves on.
    let first = streams.remove(0);
    let mut first = first;
    first.next().await.unwrap().unwrap();
    drop(first);
    drop(streams);
    // RESOURCE_EXHAUSTED means "retry later": a real client backs off and retries.
    let next = pb::GenerateRequest {
        max_tokens: 8,
        ..long
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let mut stream = loop {
        match client.generate().generate(next.clone()).await {
            Ok(s) => break s.into_inner(),
            Err(s)
                if s.code() == Code::ResourceExhausted && std::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(s) => panic!("the worker never got to the next request: {s:?}"),
        }
    };
    let mut text = String::new();
    let summary = loop {
        match stream.next().await.unwrap().unwrap().event.unwrap() {
            pb::generate_response::Event::Token(t) => text.push_str(&t.text),
            pb::generate_response::Event::Summary(s) => break s,
        }
    };
    assert!(!text.is_empty());
    assert_eq!(summary.finish_reason(), pb::FinishReason::Length);
}

#[tokio::test]
async fn a_gbnf_grammar_constrains_the_output_to_json() {
    let (_agent, client) = agent_with_smol().await;
    let grammar = r#"root ::= "{" ws "\"city\"" ws ":" ws "\"" [A-Za-z ]{1,16} "\"" ws "}"
ws ::= [ ]?"#;
    let request = pb::GenerateRequest {
        model_id: "smol".into(),
        input: chat("What is the capital of France? Answer in JSON."),
        sampling: greedy(),
        max_tokens: 48,
        grammar: grammar.into(),
        ..Default::default()
    };
    let (text, _, summary) = run(&client, request.clone()).await;
    let v: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?} is not JSON: {e}"));
    assert!(v["city"].is_string(), "{text}");
    assert_eq!(summary.finish_reason(), pb::FinishReason::Stop);

    // A grammar that does not parse is the caller's error; the agent serves on.
    let bad = pb::GenerateRequest {
        grammar: "root ::= (".into(),
        ..request.clone()
    };
    let mut stream = client.generate().generate(bad).await.unwrap().into_inner();
    // The first and only message is the summary: no token may come out.
    let summary = match stream.next().await.unwrap().unwrap().event.unwrap() {
        pb::generate_response::Event::Summary(s) => s,
        pb::generate_response::Event::Token(_) => panic!("tokens under a broken grammar"),
    };
    assert_eq!(summary.finish_reason(), pb::FinishReason::Error);
    assert!(summary.error.contains("grammar"), "{}", summary.error);
    let (again, _, _) = run(&client, request).await;
    assert_eq!(text, again);
}
