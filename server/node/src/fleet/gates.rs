//! A rollout's gates as a device evaluates them: a smoke test's greedy answer checked
//! against what the deployment expects, and the speed of the new revision against the
//! previous one, measured the same way on both while the device holds them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use modeld_engine_core::{ChatMessage, FinishReason, GenerateRequest, Sampling};

use super::{GateResult, SmokeTest};
use crate::error::{Error, Result};
use crate::inference::{Event, ModelWorker};

/// Tokens a smoke test generates unless it says otherwise, and at most.
pub const DEFAULT_SMOKE_TOKENS: u32 = 32;
pub const MAX_SMOKE_TOKENS: u32 = 512;
/// A gate's generation that has not finished in this long has failed.
const GENERATION_DEADLINE: Duration = Duration::from_secs(120);
/// Speed is the median of this many runs of [`SPEED_PROMPT`].
const SPEED_RUNS: usize = 3;
const SPEED_TOKENS: u32 = 32;
const SPEED_PROMPT: &str =
    "Write a short paragraph about lighthouses and the people who kept them.";

/// What one greedy generation produced.
struct Answer {
    text: String,
    time_to_first_token: Duration,
    generation_tokens_per_second: f64,
}

async fn generate(
    worker: &ModelWorker,
    prompt: &str,
    max_tokens: u32,
    ignore_eos: bool,
) -> Result<Answer> {
    let rendered = worker
        .render_chat(vec![ChatMessage {
            role: "user".into(),
            content: prompt.to_owned(),
        }])
        .await?;
    let tokens = worker
        .encode_prompt(
            rendered,
            true,
            modeld_engine_core::Truncation::default(),
            max_tokens,
        )
        .await?;
    let request = GenerateRequest {
        prompt: tokens,
        sampling: Sampling {
            temperature: Some(0.0),
            ..Sampling::default()
        },
        max_tokens,
        ignore_eos,
        ..GenerateRequest::default()
    };
    let started = Instant::now();
    let mut events = worker.generate(request, Some(started + GENERATION_DEADLINE))?;
    let mut text = String::new();
    let mut first = None;
    while let Some(event) = events.recv().await {
        match event {
            Event::Token(t) => {
                first.get_or_insert_with(|| started.elapsed());
                text.push_str(&t.text);
            }
            Event::Done(FinishReason::Cancelled, _) => {
                // Not an answer to judge: the model was unloaded under the test, or
                // the deadline passed.
                return Err(Error::TaskFailed(format!(
                    "cut short after {:.1} s with {} characters: the model was unloaded or the {} s deadline passed",
                    started.elapsed().as_secs_f64(),
                    text.chars().count(),
                    GENERATION_DEADLINE.as_secs()
                )));
            }
            Event::Done(_, stats) => {
                return Ok(Answer {
                    text,
                    time_to_first_token: first.unwrap_or_else(|| started.elapsed()),
                    generation_tokens_per_second: stats.generation_tokens_per_second,
                });
            }
            Event::Failed(e) => return Err(e),
        }
    }
    Err(Error::TaskFailed(
        "the generation ended without an outcome".into(),
    ))
}

/// Why `answer` misses what `test` expects, or `None` when it satisfies all of it.
pub fn check_answer(test: &SmokeTest, answer: &str) -> Option<String> {
    let trimmed = answer.trim();
    if let Some(want) = &test.contains
        && !answer.contains(want.as_str())
    {
        return Some(format!("does not contain {want:?}"));
    }
    if let Some(want) = &test.equals
        && trimmed != want.trim()
    {
        return Some(format!("is not {want:?}"));
    }
    if let Some(pattern) = &test.matches {
        match regex::Regex::new(pattern) {
            Ok(re) if re.is_match(answer) => {}
            Ok(_) => return Some(format!("does not match /{pattern}/")),
            Err(e) => return Some(format!("the pattern /{pattern}/ is invalid: {e}")),
        }
    }
    if test.json && serde_json::from_str::<serde_json::Value>(trimmed).is_err() {
        return Some("is not JSON".into());
    }
    None
}

fn shown(text: &str) -> String {
    const MAX: usize = 120;
    let mut cut: String = text.chars().take(MAX).collect();
    if cut.len() < text.len() {
        cut.push('…');
    }
    format!("{cut:?}")
}

/// Runs one smoke test on the model `worker` serves; reported under `model_id`.
pub async fn smoke(worker: &ModelWorker, model_id: &str, test: &SmokeTest) -> GateResult {
    let max_tokens = match test.max_tokens {
        0 => DEFAULT_SMOKE_TOKENS,
        n => n.min(MAX_SMOKE_TOKENS),
    };
    let (passed, detail) = match generate(worker, &test.prompt, max_tokens, false).await {
        Ok(answer) => match check_answer(test, &answer.text) {
            None => (true, format!("answered {}", shown(&answer.text))),
            Some(why) => (
                false,
                format!("answered {}, which {why}", shown(&answer.text)),
            ),
        },
        Err(e) => (false, format!("the generation failed: {e}")),
    };
    GateResult {
        model_id: model_id.to_owned(),
        gate: "smoke".into(),
        passed,
        detail,
    }
}

/// Time to first token and generation speed, each the median of a few greedy runs of
/// the same prompt and length.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Speed {
    pub time_to_first_token: Duration,
    pub generation_tokens_per_second: f64,
}

pub async fn measure(worker: &Arc<ModelWorker>) -> Result<Speed> {
    let mut ttft = Vec::with_capacity(SPEED_RUNS);
    let mut tps = Vec::with_capacity(SPEED_RUNS);
    for _ in 0..SPEED_RUNS {
        let answer = generate(worker, SPEED_PROMPT, SPEED_TOKENS, true).await?;
        ttft.push(answer.time_to_first_token);
        tps.push(answer.generation_tokens_per_second);
    }
    ttft.sort();
    tps.sort_by(f64::total_cmp);
    Ok(Speed {
        time_to_first_token: ttft[SPEED_RUNS / 2],
        generation_tokens_per_second: tps[SPEED_RUNS / 2],
    })
}

/// The speed gate: the new revision may be at most `max_slowdown` times worse than the
/// old on either figure.
pub fn compare(model_id: &str, old: Speed, new: Speed, max_slowdown: f64) -> GateResult {
    let ttft_ratio = new.time_to_first_token.as_secs_f64()
        / old.time_to_first_token.as_secs_f64().max(f64::EPSILON);
    let tps_ratio =
        old.generation_tokens_per_second / new.generation_tokens_per_second.max(f64::EPSILON);
    let passed = ttft_ratio <= max_slowdown && tps_ratio <= max_slowdown;
    GateResult {
        model_id: model_id.to_owned(),
        gate: "speed".into(),
        passed,
        detail: format!(
            "first token {:.0} ms against {:.0} ms, {:.1} tokens/s against {:.1} (at most {max_slowdown}× worse)",
            new.time_to_first_token.as_secs_f64() * 1e3,
            old.time_to_first_token.as_secs_f64() * 1e3,
            new.generation_tokens_per_second,
            old.generation_tokens_per_second,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn test() -> SmokeTest {
        SmokeTest {
            model_id: String::new(),
            prompt: "p".into(),
            max_tokens: 0,
            contains: None,
            equals: None,
            matches: None,
            json: false,
        }
    }

    #[test]
    fn every_expectation_is_checked() {
        let contains = SmokeTest {
            contains: Some("Paris".into()),
            ..test()
        };
        assert_eq!(check_answer(&contains, "It is Paris."), None);
        assert!(check_answer(&contains, "It is Lyon.").is_some());
        let equals = SmokeTest {
            equals: Some("4".into()),
            ..test()
        };
        assert_eq!(check_answer(&equals, " 4\n"), None);
        assert!(check_answer(&equals, "4.").is_some());
        let matches = SmokeTest {
            matches: Some(r"^\d+$".into()),
            ..test()
        };
        assert_eq!(check_answer(&matches, "42"), None);
        assert!(check_answer(&matches, "forty-two").is_some());
        let json = SmokeTest {
            json: true,
            ..test()
        };
        assert_eq!(check_answer(&json, " {\"a\": 1} "), None);
        assert_eq!(
            check_answer(&json, "{a: 1}").as_deref(),
            Some("is not JSON")
        );
    }

    #[test]
    fn speed_is_compared_both_ways() {
        let old = Speed {
            time_to_first_token: Duration::from_millis(100),
            generation_tokens_per_second: 50.0,
        };
        let slower_start = Speed {
            time_to_first_token: Duration::from_millis(200),
            ..old
        };
        let slower_decode = Speed {
            generation_tokens_per_second: 30.0,
            ..old
        };
        assert!(compare("m", old, old, 1.1).passed);
        assert!(!compare("m", old, slower_start, 1.5).passed);
        assert!(compare("m", old, slower_start, 2.5).passed);
        assert!(!compare("m", old, slower_decode, 1.5).passed);
    }
}
