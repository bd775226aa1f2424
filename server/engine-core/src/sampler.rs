//! The token sampler shared by every engine that hands the agent raw logits (ONNX
//! Runtime, candle). It applies the same options, with the same defaults and in the
//! same order, as llama.cpp's sampler chain in the llama engine: penalties, then
//! greedy — or top-k, top-p, min-p, temperature and a seeded draw.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::engine::{EngineError, Sampling};

/// llama.cpp's defaults, so an unset option means the same under every runtime.
pub const DEFAULT_TEMPERATURE: f32 = 0.8;
pub const DEFAULT_TOP_K: u32 = 40;
pub const DEFAULT_TOP_P: f32 = 0.95;
pub const DEFAULT_MIN_P: f32 = 0.05;
pub const DEFAULT_PENALTY_LAST_N: u32 = 64;

/// Picks tokens from logits. One per generation: it remembers the tokens it chose
/// for the repetition penalties.
pub struct Sampler {
    temperature: f32,
    top_k: u32,
    top_p: f32,
    min_p: f32,
    repeat_penalty: f32,
    frequency_penalty: f32,
    presence_penalty: f32,
    penalty_last_n: usize,
    penalties: bool,
    /// Tokens chosen so far, the last `penalty_last_n` of them counted.
    history: Vec<u32>,
    rng: StdRng,
}

impl std::fmt::Debug for Sampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sampler")
            .field("temperature", &self.temperature)
            .field("top_k", &self.top_k)
            .field("top_p", &self.top_p)
            .field("min_p", &self.min_p)
            .finish_non_exhaustive()
    }
}

/// What the sampler chose.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampled {
    pub id: u32,
    /// log softmax of the raw logits at `id` (before penalties and temperature), the
    /// number llama.cpp reports too; only when asked for (it costs a pass of `exp`
    /// over the vocabulary).
    pub logprob: Option<f32>,
}

impl Sampler {
    pub fn new(s: &Sampling) -> Sampler {
        let penalties = s.repeat_penalty.is_some()
            || s.frequency_penalty.is_some()
            || s.presence_penalty.is_some();
        Sampler {
            temperature: s.temperature.unwrap_or(DEFAULT_TEMPERATURE),
            top_k: s.top_k.unwrap_or(DEFAULT_TOP_K),
            top_p: s.top_p.unwrap_or(DEFAULT_TOP_P),
            min_p: s.min_p.unwrap_or(DEFAULT_MIN_P),
            repeat_penalty: s.repeat_penalty.unwrap_or(1.0),
            frequency_penalty: s.frequency_penalty.unwrap_or(0.0),
            presence_penalty: s.presence_penalty.unwrap_or(0.0),
            penalty_last_n: if s.penalty_last_n == 0 {
                DEFAULT_PENALTY_LAST_N as usize
            } else {
                s.penalty_last_n as usize
            },
            penalties,
            history: Vec::new(),
            // Unseeded requests still get a fresh draw each time, as llama.cpp's do.
            rng: match s.seed {
                Some(seed) => StdRng::seed_from_u64(seed),
                None => StdRng::from_os_rng(),
            },
        }
    }

    /// Chooses the next token from `logits` (one per vocabulary entry, modified in
    /// place) and remembers it for the penalties; with `logprob`, also its
    /// log-probability.
    pub fn sample(&mut self, logits: &mut [f32], logprob: bool) -> Result<Sampled, EngineError> {
        if logits.is_empty() {
            return Err(EngineError::Inference(
                "the model returned no logits".into(),
            ));
        }
        // A NaN would poison every comparison below; treat it as impossible.
        for l in logits.iter_mut() {
            if l.is_nan() {
                *l = f32::NEG_INFINITY;
            }
        }
        let log_softmax = logprob.then(|| log_softmax_terms(logits));
        // Penalties change logits in place; the log-probability is of the raw ones.
        let raw = (logprob && self.penalties).then(|| logits.to_vec());
        if self.penalties {
            self.apply_penalties(logits);
        }
        let id = if self.temperature <= 0.0 {
            argmax(logits)
        } else {
            self.draw(logits)
        }
        .ok_or_else(|| EngineError::Inference("every logit is -inf or NaN".into()))?;
        let logprob = log_softmax.map(|(max, log_sum)| {
            let raw = raw.as_deref().unwrap_or(logits);
            raw.get(id).map_or(f32::NEG_INFINITY, |l| l - max - log_sum)
        });
        self.history.push(id as u32);
        Ok(Sampled {
            id: id as u32,
            logprob,
        })
    }

    /// llama.cpp's penalties: repeated tokens' logits shrink towards zero by
    /// `repeat_penalty`, and lose `frequency × count + presence`.
    fn apply_penalties(&self, logits: &mut [f32]) {
        let start = self.history.len().saturating_sub(self.penalty_last_n);
        let mut counts: std::collections::HashMap<u32, u32> = std::collections::HashMap::new();
        for &t in &self.history[start..] {
            *counts.entry(t).or_default() += 1;
        }
        for (&t, &count) in &counts {
            let Some(l) = logits.get_mut(t as usize) else {
                continue;
            };
            if *l > 0.0 {
                *l /= self.repeat_penalty;
            } else {
                *l *= self.repeat_penalty;
            }
            #[allow(clippy::cast_precision_loss)]
            let c = count as f32;
            *l -= c * self.frequency_penalty + self.presence_penalty;
        }
    }

    /// top-k, top-p and min-p on the untempered distribution, then temperature and a
    /// draw: llama.cpp's order.
    fn draw(&mut self, logits: &[f32]) -> Option<usize> {
        let mut cand: Vec<(usize, f32)> = logits
            .iter()
            .copied()
            .enumerate()
            .filter(|(_, l)| l.is_finite())
            .collect();
        if cand.is_empty() {
            return None;
        }
        let by_logit = |a: &(usize, f32), b: &(usize, f32)| b.1.total_cmp(&a.1);
        let k = self.top_k as usize;
        if k > 0 && k < cand.len() {
            cand.select_nth_unstable_by(k - 1, by_logit);
            cand.truncate(k);
        }
        cand.sort_unstable_by(by_logit);
        let probs = softmax(cand.iter().map(|c| c.1));
        let mut keep = cand.len();
        if self.top_p < 1.0 {
            let mut sum = 0.0;
            for (i, p) in probs.iter().enumerate() {
                sum += p;
                if sum >= self.top_p {
                    keep = i + 1;
                    break;
                }
            }
        }
        if self.min_p > 0.0 {
            let floor = probs[0] * self.min_p;
            keep = keep.min(probs.iter().take_while(|p| **p >= floor).count().max(1));
        }
        cand.truncate(keep.max(1));
        let tempered = softmax(cand.iter().map(|c| c.1 / self.temperature));
        let mut u: f32 = self.rng.random();
        for (c, p) in cand.iter().zip(&tempered) {
            if u < *p {
                return Some(c.0);
            }
            u -= p;
        }
        cand.last().map(|c| c.0)
    }
}

fn argmax(logits: &[f32]) -> Option<usize> {
    let (i, l) = logits
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))?;
    (*l > f32::NEG_INFINITY).then_some(i)
}

fn softmax(logits: impl Iterator<Item = f32> + Clone) -> Vec<f32> {
    let max = logits.clone().fold(f32::NEG_INFINITY, f32::max);
    let exp: Vec<f32> = logits.map(|l| (l - max).exp()).collect();
    let sum: f32 = exp.iter().sum();
    exp.into_iter().map(|e| e / sum).collect()
}

/// The max and log-sum-exp of `logits`: log softmax at i is `l[i] - max - log_sum`.
fn log_softmax_terms(logits: &[f32]) -> (f32, f32) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let log_sum = logits.iter().map(|l| (l - max).exp()).sum::<f32>().ln();
    (max, log_sum)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampling(temperature: f32, seed: u64) -> Sampling {
        Sampling {
            temperature: Some(temperature),
            seed: Some(seed),
            ..Sampling::default()
        }
    }

    #[test]
    fn greedy_takes_the_largest_logit() {
        let mut s = Sampler::new(&sampling(0.0, 1));
        let got = s.sample(&mut [0.1, 3.0, f32::NAN, 2.9], true).unwrap();
        assert_eq!(got.id, 1);
        let logprob = got.logprob.unwrap();
        assert!(logprob < 0.0 && logprob > -1.0);
        assert_eq!(s.sample(&mut [0.1, 3.0], false).unwrap().logprob, None);
    }

    #[test]
    fn the_same_seed_draws_the_same_tokens() {
        let logits: Vec<f32> = (0..100).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let run = |seed| {
            let mut s = Sampler::new(&sampling(1.0, seed));
            (0..20)
                .map(|_| s.sample(&mut logits.clone(), false).unwrap().id)
                .collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn top_k_one_is_greedy() {
        let mut s = Sampler::new(&Sampling {
            top_k: Some(1),
            ..sampling(5.0, 3)
        });
        for _ in 0..20 {
            assert_eq!(s.sample(&mut [1.0, 1.5, 0.2], false).unwrap().id, 1);
        }
    }

    #[test]
    fn min_p_removes_unlikely_tokens() {
        // p(2) is e^-10 of p(0): far below min_p 0.05 of the best.
        let mut s = Sampler::new(&Sampling {
            min_p: Some(0.05),
            top_k: Some(0),
            top_p: Some(1.0),
            ..sampling(1.0, 9)
        });
        for _ in 0..200 {
            assert_ne!(s.sample(&mut [10.0, 10.0, 0.0], false).unwrap().id, 2);
        }
    }

    #[test]
    fn repeat_penalty_moves_greedy_off_a_repeated_token() {
        let mut s = Sampler::new(&Sampling {
            repeat_penalty: Some(2.0),
            ..sampling(0.0, 1)
        });
        assert_eq!(s.sample(&mut [2.0, 1.5], false).unwrap().id, 0);
        // 2.0 / 2 = 1.0 < 1.5 once token 0 was chosen.
        assert_eq!(s.sample(&mut [2.0, 1.5], false).unwrap().id, 1);
    }

    #[test]
    fn all_impossible_logits_are_an_error_not_a_panic() {
        let mut s = Sampler::new(&sampling(0.7, 1));
        assert!(s.sample(&mut [f32::NEG_INFINITY, f32::NAN], false).is_err());
        assert!(s.sample(&mut [], false).is_err());
    }
}
