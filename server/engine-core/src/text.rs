//! Turning a stream of token bytes into text a client can show: UTF-8 characters split
//! across tokens are held back until complete, and stop strings that span tokens are
//! caught before any of their text is emitted. Shared by every engine.

/// Accumulates token bytes and releases the longest valid UTF-8 prefix.
#[derive(Debug, Default)]
pub struct Utf8Stream {
    pending: Vec<u8>,
}

impl Utf8Stream {
    /// Adds bytes; returns the text that is now complete.
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let valid = match std::str::from_utf8(&self.pending) {
            Ok(_) => self.pending.len(),
            Err(e) if e.error_len().is_some() => {
                // Bytes that can never become valid: replace them rather than stall.
                let text = String::from_utf8_lossy(&self.pending).into_owned();
                self.pending.clear();
                return text;
            }
            Err(e) => e.valid_up_to(),
        };
        let rest = self.pending.split_off(valid);
        String::from_utf8(std::mem::replace(&mut self.pending, rest)).unwrap_or_default()
    }

    /// Whatever is left at the end, lossily.
    pub fn finish(&mut self) -> String {
        let text = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        text
    }
}

/// Finds stop strings in generated text, holding back any tail that could still
/// become one.
#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
}

/// What to do with newly generated text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopOutcome {
    /// Emit this text (possibly empty) and go on.
    Emit(String),
    /// A stop string was found: emit this text (what preceded it) and finish.
    Stopped(String),
}

impl StopMatcher {
    pub fn new(stops: &[String]) -> Self {
        StopMatcher {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            held: String::new(),
        }
    }

    pub fn push(&mut self, text: &str) -> StopOutcome {
        if self.stops.is_empty() {
            return StopOutcome::Emit(text.to_owned());
        }
        self.held.push_str(text);
        let earliest = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min();
        if let Some(at) = earliest {
            let before = self.held[..at].to_owned();
            self.held.clear();
            return StopOutcome::Stopped(before);
        }
        // Keep the longest tail that is a prefix of some stop string.
        let mut keep = 0;
        for stop in &self.stops {
            for len in (1..stop.len().min(self.held.len() + 1)).rev() {
                if self.held.is_char_boundary(self.held.len() - len)
                    && stop.is_char_boundary(len)
                    && self.held.ends_with(&stop[..len])
                {
                    keep = keep.max(len);
                    break;
                }
            }
        }
        let cut = self.held.len() - keep;
        let out = self.held[..cut].to_owned();
        self.held.drain(..cut);
        StopOutcome::Emit(out)
    }

    /// Text held back when generation ends for another reason.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

/// An error and its causes on one line: the top-level messages of HTTP and gRPC stacks
/// ("error sending request") hide what actually went wrong.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(cause) = cur {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        cur = cause.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multibyte_characters_split_across_tokens_are_held_back() {
        let mut s = Utf8Stream::default();
        let bytes = "日本".as_bytes();
        assert_eq!(s.push(&bytes[..2]), "");
        assert_eq!(s.push(&bytes[2..4]), "日");
        assert_eq!(s.push(&bytes[4..]), "本");
        assert_eq!(s.finish(), "");
    }

    #[test]
    fn a_stop_string_spanning_tokens_is_never_emitted() {
        let mut m = StopMatcher::new(&["<|im_end|>".into(), "\n\n".into()]);
        assert_eq!(m.push("Hello <|im"), StopOutcome::Emit("Hello ".into()));
        assert_eq!(m.push("_en"), StopOutcome::Emit(String::new()));
        assert_eq!(m.push("d|> more"), StopOutcome::Stopped(String::new()));
        let mut m = StopMatcher::new(&["STOP".into()]);
        assert_eq!(m.push("aST"), StopOutcome::Emit("a".into()));
        assert_eq!(m.push("x"), StopOutcome::Emit("STx".into()));
        assert_eq!(m.push("yy STOP zz"), StopOutcome::Stopped("yy ".into()));
    }
}
