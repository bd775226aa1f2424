//! What the agent and an engine process say to each other over their socket: one
//! frame per message, a little-endian u32 length and then the message in postcard.
//! Both ends are the same binary, so the format needs no versioning beyond that.

use std::io::{self, Read, Write};
use std::path::PathBuf;

use modeld_engine_core::{
    ChatMessage, EngineError, FinishReason, GenerateRequest, GenerateStats, LoadOptions, ModelInfo,
    Runtime, SpecialTokens, Token,
};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

/// The largest frame either side accepts. The biggest real one is the vocabulary
/// sent at load (a few MiB for a 256k-token model).
pub const MAX_FRAME_BYTES: usize = 64 << 20;

/// Request ids the agent picks; replies carry them back.
pub type CallId = u64;

/// Agent → engine process.
#[derive(Debug, Serialize, Deserialize)]
pub enum ToEngine {
    /// The first frame, and only once.
    Load {
        runtime: Runtime,
        path: PathBuf,
        options: LoadOptions,
    },
    Generate {
        id: CallId,
        request: GenerateRequest,
    },
    /// The client left: stop that generation within a token.
    Cancel { id: CallId },
    Encode {
        id: CallId,
        text: String,
        add_special: bool,
        parse_special: bool,
    },
    Decode {
        id: CallId,
        ids: Vec<u32>,
        skip_special: bool,
    },
    RenderChat {
        id: CallId,
        messages: Vec<ChatMessage>,
        add_generation_prompt: bool,
    },
}

/// What a loaded model's tokenizer is, sent once so the agent answers the cheap
/// questions (special tokens, a token's bytes) without a round trip.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenizerFacts {
    pub provider: String,
    pub special: SpecialTokens,
    pub max_length: u32,
    /// Each token's bytes, by id.
    pub vocabulary: Vec<Vec<u8>>,
}

/// Engine process → agent.
#[derive(Debug, Serialize, Deserialize)]
pub enum ToAgent {
    Loaded {
        info: ModelInfo,
        parallel: u32,
        tokenizer: TokenizerFacts,
        /// What confines the process, for the agent's log.
        confinement: String,
    },
    LoadFailed(EngineError),
    Token {
        id: CallId,
        token: Token,
    },
    Done {
        id: CallId,
        outcome: Result<(FinishReason, GenerateStats), EngineError>,
    },
    Reply {
        id: CallId,
        result: Result<Reply, EngineError>,
    },
}

#[derive(Debug, Serialize, Deserialize)]
pub enum Reply {
    Ids(Vec<u32>),
    Text(String),
}

/// One message as a frame: its length, then its body.
pub fn encode<T: Serialize>(message: &T) -> io::Result<Vec<u8>> {
    let body = postcard::to_stdvec(message).map_err(io::Error::other)?;
    if body.len() > MAX_FRAME_BYTES {
        return Err(io::Error::other(format!(
            "a {}-byte message is over the {MAX_FRAME_BYTES}-byte frame limit",
            body.len()
        )));
    }
    let len = u32::try_from(body.len()).map_err(io::Error::other)?;
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&len.to_le_bytes());
    frame.extend_from_slice(&body);
    Ok(frame)
}

/// Writes one frame.
pub fn write<W: Write, T: Serialize>(out: &mut W, message: &T) -> io::Result<()> {
    // One write per frame: a token is one syscall on the way out.
    out.write_all(&encode(message)?)?;
    out.flush()
}

/// Reads one frame on the async runtime; `Ok(None)` at a clean end of stream.
pub async fn read_async<R, T>(input: &mut R) -> io::Result<Option<T>>
where
    R: tokio::io::AsyncRead + Unpin,
    T: DeserializeOwned,
{
    use tokio::io::AsyncReadExt as _;
    let mut len = [0u8; 4];
    match input.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a {len}-byte frame is over the {MAX_FRAME_BYTES}-byte limit"),
        ));
    }
    let mut body = vec![0u8; len];
    input.read_exact(&mut body).await?;
    postcard::from_bytes(&body)
        .map(Some)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Reads one frame; `Ok(None)` at a clean end of stream.
pub fn read<R: Read, T: DeserializeOwned>(input: &mut R) -> io::Result<Option<T>> {
    let mut len = [0u8; 4];
    match input.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a {len}-byte frame is over the {MAX_FRAME_BYTES}-byte limit"),
        ));
    }
    let mut body = vec![0u8; len];
    input.read_exact(&mut body)?;
    postcard::from_bytes(&body)
        .map(Some)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_back_to_back_and_end_cleanly() {
        let mut pipe = Vec::new();
        let token = ToAgent::Token {
            id: 7,
            token: Token {
                id: 42,
                text: "héllo".into(),
                logprob: Some(f32::NEG_INFINITY),
            },
        };
        write(&mut pipe, &token).unwrap();
        write(
            &mut pipe,
            &ToAgent::Done {
                id: 7,
                outcome: Err(EngineError::Crashed("was killed".into())),
            },
        )
        .unwrap();
        let mut input = pipe.as_slice();
        match read::<_, ToAgent>(&mut input).unwrap() {
            Some(ToAgent::Token { id: 7, token }) => {
                assert_eq!(token.text, "héllo");
                assert_eq!(token.logprob, Some(f32::NEG_INFINITY));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            read::<_, ToAgent>(&mut input).unwrap(),
            Some(ToAgent::Done {
                id: 7,
                outcome: Err(EngineError::Crashed(_))
            })
        ));
        assert!(read::<_, ToAgent>(&mut input).unwrap().is_none());
    }

    #[test]
    fn an_oversized_or_cut_frame_is_an_error_not_a_huge_allocation() {
        let huge = u32::try_from(MAX_FRAME_BYTES + 1).unwrap().to_le_bytes();
        let err = read::<_, ToAgent>(&mut huge.as_slice()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);

        let mut cut = 10u32.to_le_bytes().to_vec();
        cut.extend_from_slice(&[1, 2, 3]);
        let err = read::<_, ToAgent>(&mut cut.as_slice()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }
}
