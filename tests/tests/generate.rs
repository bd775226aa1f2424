//! Generate, Tokenize and Detokenize on the real SmolLM2 GGUF through llama.cpp.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use modeld_e2e::{Agent, AgentOptions, Assets, Client, SMOLLM2_SHA256, SMOLLM2_SIZE, pb, reason};
use tokio_stream::StreamExt;
use tonic::Code;

async fn agent_with_smol() -> (Agent, Client) {
    agent_with_smol_args(&[]).await
}

/// An agent with SmolLM2 stored and loaded, started with extra `args`.
async fn agent_with_smol_args(args: &[&str]) -> (Agent, Client) {
    let assets = Assets::get();
    let agent = Agent::start_with(AgentOptions {
        args: args.iter().map(|a| (*a).to_owned()).collect(),
        ..AgentOptions::default()
    })
    .await;
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
    client.load_to_end("smol", None).await.unwrap();
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
    let (text, ids, summary) = run_ids(client, request).await;
    (text, ids.len(), summary)
}

/// Runs a generation to the end: (text, token ids, summary).
async fn run_ids(
    client: &Client,
    request: pb::GenerateRequest,
) -> (String, Vec<u32>, pb::GenerateSummary) {
    let mut stream = client
        .generate()
        .generate(request)
        .await
        .unwrap()
        .into_inner();
    let mut text = String::new();
    let mut ids = Vec::new();
    while let Some(msg) = stream.next().await {
        match msg.unwrap().event.unwrap() {
            pb::generate_response::Event::Token(t) => {
                text.push_str(&t.text);
                ids.push(t.token_id);
            }
            pb::generate_response::Event::Summary(s) => return (text, ids, s),
        }
    }
    panic!("the stream ended without a summary");
}

#[tokio::test]
async fn greedy_chat_streams_tokens_then_a_summary_and_repeats_exactly() {
    let (_agent, client) = agent_with_smol().await;
    let request = pb::GenerateRequest {
        model_id: "smol".into(),
        input: chat("Tell me the capital of France."),
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

    // A stop string that spans two generated tokens: everything before it comes out,
    // nothing of it does.
    let mut stream = client
        .generate()
        .generate(base.clone())
        .await
        .unwrap()
        .into_inner();
    let mut pieces = Vec::new();
    while let Some(msg) = stream.next().await {
        if let pb::generate_response::Event::Token(t) = msg.unwrap().event.unwrap() {
            pieces.push(t.text);
        }
    }
    assert_eq!(pieces.concat(), full);
    // Up to two characters from each side of a boundary between two tokens that
    // show text (the model may count in words or, on some CPUs' kernels, in digits).
    let k = (2..pieces.len() - 1)
        .find(|&k| !pieces[k].trim().is_empty() && !pieces[k + 1].trim().is_empty())
        .expect("two adjacent tokens with text");
    let tail: String = {
        let c: Vec<char> = pieces[k].chars().collect();
        c[c.len().saturating_sub(2)..].iter().collect()
    };
    let head: String = pieces[k + 1].chars().take(2).collect();
    let stop = format!("{tail}{head}");
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
    assert_eq!(
        stopped,
        full[..at],
        "stop {stop:?} spanning {:?} and {:?}",
        pieces[k],
        pieces[k + 1]
    );
    assert!(!stopped.contains(&stop));
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
    assert_eq!(missing.code(), Code::InvalidArgument);
    assert!(missing.message().contains("model_id"), "{missing:?}");
    let refused = |status: tonic::Status, field: &str| {
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains(field), "{field}: {status:?}");
    };
    for (sampling, field) in [
        (
            pb::SamplingParams {
                temperature: Some(-0.5),
                ..Default::default()
            },
            "sampling.temperature",
        ),
        (
            pb::SamplingParams {
                top_p: Some(0.0),
                ..Default::default()
            },
            "sampling.top_p",
        ),
        (
            pb::SamplingParams {
                top_p: Some(1.5),
                ..Default::default()
            },
            "sampling.top_p",
        ),
    ] {
        let status = g
            .generate(pb::GenerateRequest {
                sampling: Some(sampling),
                ..base.clone()
            })
            .await
            .err()
            .unwrap();
        refused(status, field);
    }
    let empty = g
        .generate(pb::GenerateRequest {
            input: Some(pb::generate_request::Input::Prompt(String::new())),
            ..base.clone()
        })
        .await
        .err()
        .unwrap();
    refused(empty, "prompt");
    let too_many = g
        .generate(pb::GenerateRequest {
            max_tokens: 1_000_000,
            ..base.clone()
        })
        .await
        .err()
        .unwrap();
    refused(too_many, "max_tokens");
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
    assert_eq!(reason(&absent), "MODEL_NOT_READY");
    assert!(absent.message().contains("registered"), "{absent:?}");
    // Load fetches it first; its bytes are not what the spec promises.
    let not_stored = client.load_to_end("not-here", None).await.unwrap_err();
    let not_stored = not_stored.status().unwrap();
    assert_eq!(not_stored.code(), Code::DataLoss);
    assert_eq!(reason(not_stored), "CHECKSUM_MISMATCH");

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
    let invalid = client.load_to_end("broken", None).await.unwrap_err();
    let invalid = invalid.status().unwrap();
    assert_eq!(invalid.code(), Code::InvalidArgument);
    assert_eq!(reason(invalid), "MODEL_INVALID");
    let failed = g
        .generate(pb::GenerateRequest {
            model_id: "broken".into(),
            ..base.clone()
        })
        .await
        .err()
        .unwrap();
    assert_eq!(reason(&failed), "MODEL_NOT_READY");
    assert!(failed.message().contains("failed"), "{failed:?}");

    let (text, _, _) = run(&client, base).await;
    assert!(!text.is_empty(), "the agent still serves");
}

#[tokio::test]
async fn a_full_queue_is_refused_at_once_and_a_dropped_stream_frees_the_worker() {
    let (_agent, client) =
        agent_with_smol_args(&["--parallel", "1", "--max-queued-requests", "3"]).await;
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

/// The same greedy chat request gives the same text through the whole gRPC stream as
/// through the engine called in-process with the same tokenizer and template.
#[tokio::test]
async fn greedy_chat_through_grpc_matches_the_engine_called_directly() {
    use modeld_engine_core::{ChatMessage, Engine, Flow, GenerateRequest, LoadOptions, Sampling};

    let question = "Tell me the capital of France.";
    let direct = tokio::task::spawn_blocking(move || {
        let gguf = Assets::get().gguf;
        let mut model = modeld_engine_llama::LlamaEngine::default()
            .load(
                &gguf,
                &LoadOptions {
                    use_mmap: true,
                    parallel: 1,
                    ..LoadOptions::default()
                },
            )
            .unwrap();
        let tokenizer = modeld::tokenizer::for_model(
            &gguf,
            modeld_engine_core::ModelFormat::Gguf,
            Some(model.tokenizer()),
            model.info().chat_template.as_deref(),
        )
        .unwrap();
        let text = tokenizer
            .render_chat(
                &[ChatMessage {
                    role: "user".into(),
                    content: question.into(),
                }],
                true,
            )
            .unwrap();
        let request = GenerateRequest {
            prompt: tokenizer.encode(&text, true, true).unwrap(),
            sampling: Sampling {
                temperature: Some(0.0),
                ..Sampling::default()
            },
            max_tokens: 24,
            ..GenerateRequest::default()
        };
        let mut out = String::new();
        model
            .generate(&request, &mut |t| {
                out.push_str(&t.text);
                Flow::Continue
            })
            .unwrap();
        out
    })
    .await
    .unwrap();

    let (_agent, client) = agent_with_smol().await;
    let (streamed, _, _) = run(
        &client,
        pb::GenerateRequest {
            model_id: "smol".into(),
            input: chat(question),
            sampling: greedy(),
            max_tokens: 24,
            ..Default::default()
        },
    )
    .await;
    assert!(!direct.is_empty());
    assert_eq!(streamed, direct);
}

#[tokio::test]
async fn a_seeded_sample_is_reproducible() {
    let (_agent, client) = agent_with_smol().await;
    let sampled = |seed: u64| pb::GenerateRequest {
        model_id: "smol".into(),
        input: chat("Write one sentence about the sea."),
        sampling: Some(pb::SamplingParams {
            temperature: Some(1.0),
            top_k: Some(100),
            top_p: Some(0.98),
            seed: Some(seed),
            ..Default::default()
        }),
        max_tokens: 32,
        ..Default::default()
    };
    let (a, _, _) = run(&client, sampled(42)).await;
    let (b, _, _) = run(&client, sampled(42)).await;
    assert_eq!(a, b, "the same seed samples the same text");
    let mut others = Vec::new();
    for seed in [7, 1234, 99_999] {
        others.push(run(&client, sampled(seed)).await.0);
    }
    assert!(
        others.iter().any(|o| *o != a),
        "different seeds sample differently: {a:?} vs {others:?}"
    );
}

/// Four requests to one model run together in one batch (continuous batching):
/// every stream has its first token long before any of them finishes, where a queue
/// would finish the first before the second starts.
#[tokio::test]
async fn concurrent_requests_share_the_batch_instead_of_queueing() {
    let (_agent, client) = agent_with_smol_args(&["--parallel", "4"]).await;
    let request = |i: usize| pb::GenerateRequest {
        model_id: "smol".into(),
        input: chat(&format!("Write a story about lighthouse number {i}.")),
        sampling: greedy(),
        max_tokens: 48,
        ..Default::default()
    };
    let (events_tx, mut events) = tokio::sync::mpsc::unbounded_channel::<(usize, bool)>();
    let mut tasks = Vec::new();
    for i in 0..4 {
        let client = client.clone();
        let events_tx = events_tx.clone();
        let request = request(i);
        tasks.push(tokio::spawn(async move {
            let mut stream = client
                .generate()
                .generate(request)
                .await
                .unwrap()
                .into_inner();
            let mut first = true;
            let mut generated = 0;
            while let Some(msg) = stream.next().await {
                match msg.unwrap().event.unwrap() {
                    pb::generate_response::Event::Token(_) => {
                        if first {
                            events_tx.send((i, false)).unwrap();
                            first = false;
                        }
                    }
                    pb::generate_response::Event::Summary(s) => {
                        generated = s.usage.unwrap().generated_tokens;
                        events_tx.send((i, true)).unwrap();
                    }
                }
            }
            generated
        }));
    }
    drop(events_tx);
    let mut order = Vec::new();
    while let Some(e) = events.recv().await {
        order.push(e);
    }
    for t in tasks {
        assert!(t.await.unwrap() > 0);
    }
    let first_finish = order.iter().position(|(_, done)| *done).unwrap();
    let started_before = order[..first_finish]
        .iter()
        .filter(|(_, done)| !done)
        .count();
    assert_eq!(
        started_before, 4,
        "all four streams started before any finished: {order:?}"
    );
}

/// A prompt longer than the context is refused unless the request says how to cut it.
#[tokio::test]
async fn an_overlong_prompt_is_refused_or_truncated_as_asked() {
    let (_agent, client) = agent_with_smol_args(&["--context-length", "64"]).await;
    let request = |truncation: pb::Truncation| pb::GenerateRequest {
        model_id: "smol".into(),
        input: Some(pb::generate_request::Input::Prompt(
            "one two three four five six seven eight nine ten ".repeat(20),
        )),
        sampling: greedy(),
        max_tokens: 8,
        truncation: truncation as i32,
        ignore_eos: true,
        ..Default::default()
    };
    let refused = client
        .generate()
        .generate(request(pb::Truncation::Unspecified))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(
        refused.message().contains("prompt") && refused.message().contains("64-token"),
        "{refused:?}"
    );
    for cut in [pb::Truncation::KeepStart, pb::Truncation::KeepEnd] {
        let (text, generated, summary) = run(&client, request(cut)).await;
        assert_eq!(generated, 8, "{cut:?}: {text:?}");
        assert_eq!(summary.usage.unwrap().prompt_tokens, 64 - 8, "{cut:?}");
    }
}

/// Unload gives the memory back: the weights are unmapped and the context freed, and
/// the model says so in its state.
#[tokio::test]
async fn unloading_frees_the_model_and_reports_its_state() {
    let (agent, client) = agent_with_smol().await;
    let (text, _, _) = run(
        &client,
        pb::GenerateRequest {
            model_id: "smol".into(),
            input: chat("Tell me the capital of France."),
            sampling: greedy(),
            max_tokens: 8,
            ..Default::default()
        },
    )
    .await;
    assert!(!text.is_empty());
    let listed = client.list_loaded().await.unwrap();
    let loaded = &listed.models[0];
    assert_eq!(loaded.model_id, "smol");
    assert_eq!(loaded.runtime(), pb::Runtime::LlamaCpp);
    // Weights (98 MB) plus the KV cache of 4 slots of 4096 tokens.
    assert!(loaded.estimated_memory_bytes > 98_000_000, "{loaded:?}");
    assert!(loaded.actual_memory_bytes > 98_000_000, "{loaded:?}");
    // The model lives in its engine process: that is what unloading must free.
    let engine = loaded.engine_process_id;
    assert!(engine != 0 && engine != agent.pid());
    assert!(modeld_e2e::rss_bytes(engine) > 98_000_000);

    let unloaded = client.unload("smol", None).await.unwrap();
    assert_eq!(unloaded.state(), pb::ModelState::Downloaded);
    // Unload answers once the process has exited and been reaped: all of it is back.
    assert!(
        !std::path::Path::new(&format!("/proc/{engine}")).exists(),
        "engine process {engine} is still there after the unload"
    );
    let listed = client.list_loaded().await.unwrap();
    assert!(listed.models.is_empty());
    let state = client.state("smol", 0).await.unwrap();
    assert_eq!(state.state(), pb::ModelState::Downloaded);
    let refused = client
        .generate()
        .generate(pb::GenerateRequest {
            model_id: "smol".into(),
            input: chat("Hi"),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&refused), "MODEL_NOT_READY");
    assert!(refused.message().contains("downloaded"), "{refused:?}");
    // And it loads again.
    client.load_to_end("smol", None).await.unwrap();
}

/// Threads of a process, from /proc.
fn thread_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|tasks| tasks.count())
        .unwrap_or(0)
}

/// A load that names no thread count runs one thread per physical core the agent may
/// use, not llama.cpp's own default of 4 (on 2 cores that generated at a quarter of the
/// speed): ListLoaded says how many, and the engine process runs that many, its
/// compute threads being llama.cpp's OpenMP team (the count less the calling thread).
#[tokio::test]
async fn a_load_without_threads_runs_one_per_physical_core_and_says_so() {
    let (_agent, client) = agent_with_smol().await;
    let caps = client.capabilities().await.unwrap();
    let physical = caps.cpu.unwrap().physical_cores;
    let allowed = std::thread::available_parallelism().unwrap().get() as u32;
    let expected = physical.clamp(1, allowed);
    let request = pb::GenerateRequest {
        model_id: "smol".into(),
        input: chat("Tell me the capital of France."),
        sampling: greedy(),
        max_tokens: 8,
        ..Default::default()
    };
    // Threads of the engine process once it has generated (OpenMP starts its team at
    // the first computation), with what ListLoaded says.
    let threads_running = |client: Client, request: pb::GenerateRequest| async move {
        let (text, _, _) = run(&client, request).await;
        assert!(text.contains("Paris"), "{text:?}");
        let listed = client.list_loaded().await.unwrap();
        let loaded = &listed.models[0];
        (loaded.threads, thread_count(loaded.engine_process_id))
    };
    let (listed_default, tasks_default) = threads_running(client.clone(), request.clone()).await;
    assert_eq!(
        listed_default, expected,
        "physical {physical}, allowed {allowed}"
    );

    client.unload("smol", None).await.unwrap();
    let one = pb::LoadOptions {
        threads: 1,
        ..Default::default()
    };
    client.load_to_end("smol", Some(one)).await.unwrap();
    let (listed_one, tasks_one) = threads_running(client.clone(), request).await;
    assert_eq!(listed_one, 1);
    assert_eq!(
        tasks_default - tasks_one,
        expected as usize - 1,
        "engine process threads: {tasks_default} with the default, {tasks_one} with one"
    );
}

/// A quantized KV cache (llama.cpp): the estimate shrinks by what the cache saves,
/// ListLoaded says what was applied, greedy answers stay right, a pinned model keeps
/// it across a restart, and combinations llama.cpp cannot run are refused up front.
#[tokio::test]
async fn a_q8_0_kv_cache_halves_the_cache_and_still_answers() {
    let (agent, client) = agent_with_smol().await;
    let options = |kv: pb::KvCacheType, fa: pb::FlashAttention, pin: bool| {
        Some(pb::LoadOptions {
            context_length: 8192,
            max_concurrent_requests: 1,
            kv_cache_type: kv as i32,
            flash_attention: fa as i32,
            pin,
            ..Default::default()
        })
    };
    client.unload("smol", None).await.unwrap();
    let f16 = client
        .load_to_end(
            "smol",
            options(
                pb::KvCacheType::Unspecified,
                pb::FlashAttention::Unspecified,
                false,
            ),
        )
        .await
        .unwrap();
    assert_eq!(f16.kv_cache_type(), pb::KvCacheType::F16);
    assert_eq!(f16.flash_attention(), pb::FlashAttention::Auto);
    client.unload("smol", None).await.unwrap();
    let q8 = client
        .load_to_end(
            "smol",
            options(pb::KvCacheType::Q80, pb::FlashAttention::Auto, true),
        )
        .await
        .unwrap();
    assert_eq!(q8.kv_cache_type(), pb::KvCacheType::Q80);
    // SmolLM2-135M: 30 layers x 3 KV heads x 64 wide, K and V, 8192 positions:
    // 188.7 MB at f16, 100.3 MB at q8_0 (34 bytes per 32 values).
    let saved = f16.estimated_memory_bytes - q8.estimated_memory_bytes;
    let values: u64 = 2 * 30 * 3 * 64 * u64::from(f16.context_length);
    assert_eq!(saved, values * 2 - values / 32 * 34, "{f16:?}\n{q8:?}");
    let listed = client.list_loaded().await.unwrap();
    assert_eq!(listed.models[0].kv_cache_type(), pb::KvCacheType::Q80);
    let request = pb::GenerateRequest {
        model_id: "smol".into(),
        input: chat("Tell me the capital of France."),
        sampling: greedy(),
        max_tokens: 24,
        ..Default::default()
    };
    let (text, _, _) = run(&client, request).await;
    assert!(text.contains("Paris"), "{text:?}");

    // Pinned: the restart brings it back with the same cache.
    let agent = agent.restart().await;
    let client = agent.client().await;
    let waited = std::time::Instant::now();
    let back = loop {
        let listed = client.list_loaded().await.unwrap();
        if let Some(m) = listed.models.into_iter().next() {
            break m;
        }
        assert!(
            waited.elapsed() < std::time::Duration::from_secs(60),
            "the pinned model never came back"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert_eq!(back.kv_cache_type(), pb::KvCacheType::Q80);
    // A model reloaded with nobody watching unloads like any other (its load once
    // waited forever on a progress channel nobody read).
    tokio::time::timeout(
        std::time::Duration::from_secs(30),
        client.unload("smol", None),
    )
    .await
    .expect("the unload of the reloaded model finished")
    .unwrap();

    // A quantized V cache needs the fused attention kernel.
    let refused = client
        .load_to_end(
            "smol",
            options(pb::KvCacheType::Q40, pb::FlashAttention::Off, false),
        )
        .await
        .unwrap_err();
    let status = refused.status().unwrap();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status.message().contains("options.kv_cache_type"),
        "{status:?}"
    );
    // Another runtime has no such option, and says so rather than ignoring it.
    if cfg!(feature = "candle") {
        let mut candle = options(pb::KvCacheType::Q80, pb::FlashAttention::Auto, false).unwrap();
        candle.runtime = pb::Runtime::Candle as i32;
        let refused = client
            .load_to_end("smol", Some(candle))
            .await
            .unwrap_err()
            .to_string();
        assert!(refused.contains("llama.cpp options"), "{refused}");
    }
}

/// A chat client sends the whole conversation every turn. With the prompt cache a
/// turn computes only what the last turn's prompt did not hold, and its greedy reply
/// is the same, token for token, as with the whole prompt computed again.
#[tokio::test]
async fn the_next_turn_of_a_chat_reuses_the_last_prompt_and_answers_as_without_it() {
    let (_agent, client) = agent_with_smol().await;
    let questions = [
        "What is the capital of France?",
        "Tell me about its history.",
        "Which river runs through it?",
        "Name three famous museums there.",
        "What food is the city known for?",
    ];
    let mut messages = Vec::new();
    let mut last_prompt = 0;
    for (turn, question) in questions.iter().enumerate() {
        messages.push(pb::ChatMessage {
            role: pb::ChatRole::User as i32,
            content: (*question).into(),
        });
        let request = |cache_prompt: bool| pb::GenerateRequest {
            model_id: "smol".into(),
            input: Some(pb::generate_request::Input::Chat(pb::ChatMessages {
                messages: messages.clone(),
            })),
            sampling: greedy(),
            max_tokens: 48,
            cache_prompt: Some(cache_prompt),
            ..Default::default()
        };
        let (text, ids, summary) = run_ids(&client, request(true)).await;
        let (_, fresh_ids, fresh) = run_ids(&client, request(false)).await;
        assert_eq!(
            ids, fresh_ids,
            "turn {turn}: the reply with the cache differs from the reply without it"
        );
        let usage = summary.usage.unwrap();
        let fresh = fresh.usage.unwrap();
        assert_eq!(
            fresh.cached_prompt_tokens, 0,
            "cache_prompt false reuses nothing"
        );
        assert_eq!(usage.prompt_tokens, fresh.prompt_tokens);
        assert!(
            usage.cached_prompt_tokens < usage.prompt_tokens,
            "{usage:?}"
        );
        // The first prompt is shorter than one attention tile (64 rows), so its rows
        // took another kernel than the second prompt's fresh rows would: the second
        // turn cannot reuse them exactly. From the third turn on, all of the last
        // prompt is kept but at most one tile, computed again with the new tokens.
        if turn >= 2 {
            assert!(
                usage.cached_prompt_tokens + 64 >= last_prompt,
                "turn {turn}: {} of the last prompt's {last_prompt} tokens reused",
                usage.cached_prompt_tokens
            );
        }
        last_prompt = usage.prompt_tokens;
        messages.push(pb::ChatMessage {
            role: pb::ChatRole::Assistant as i32,
            content: text,
        });
    }
}
