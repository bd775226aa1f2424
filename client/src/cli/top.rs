//! `modelctl top`: a live view of one agent, redrawn from its RPCs every interval
//! (ListLoaded, ListTransfers, GetCapabilities); `q`, Esc or Ctrl-C quits. Without a
//! terminal (or with `--once`) it prints one frame and exits.

use std::io::{IsTerminal as _, Write as _};
use std::time::Duration;

use clap::Args;
use crossterm::event::{self, Event, KeyCode, KeyEvent, KeyModifiers};
use crossterm::{cursor, execute, terminal};
use modelctl::{Client, ClientError};
use modeld_proto::v1 as pb;

use super::output;

#[derive(Debug, Args)]
pub struct TopArgs {
    /// Milliseconds between refreshes (100 or more).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(100..))]
    pub interval_ms: u64,
    /// Print one frame and exit.
    #[arg(long)]
    pub once: bool,
}

/// Restores the terminal however `top` ends.
struct Screen;

impl Screen {
    fn enter() -> anyhow::Result<Screen> {
        terminal::enable_raw_mode()?;
        execute!(
            std::io::stdout(),
            terminal::EnterAlternateScreen,
            cursor::Hide
        )?;
        Ok(Screen)
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        let _ = execute!(
            std::io::stdout(),
            cursor::Show,
            terminal::LeaveAlternateScreen
        );
        let _ = terminal::disable_raw_mode();
    }
}

fn seconds(s: f64) -> String {
    if s <= 0.0 {
        "-".to_owned()
    } else if s < 1.0 {
        format!("{:.0} ms", s * 1e3)
    } else {
        format!("{s:.2} s")
    }
}

fn rate(r: f64) -> String {
    if r <= 0.0 {
        "-".to_owned()
    } else {
        format!("{r:.1}")
    }
}

/// One frame: the node, its loaded models, its transfers.
async fn frame(client: &Client, addr: &str) -> anyhow::Result<String> {
    let (caps, loaded, transfers) = tokio::try_join!(
        async {
            client
                .node()
                .get_capabilities(pb::GetCapabilitiesRequest {})
                .await
                .map_err(ClientError::from)
        },
        async {
            client
                .lifecycle()
                .list_loaded(pb::ListLoadedRequest {})
                .await
                .map_err(ClientError::from)
        },
        async {
            client
                .storage()
                .list_transfers(pb::ListTransfersRequest::default())
                .await
                .map_err(ClientError::from)
        },
    )?;
    let (caps, loaded, transfers) = (
        caps.into_inner(),
        loaded.into_inner(),
        transfers.into_inner(),
    );
    let memory = caps.memory.unwrap_or_default();
    let mut out = format!(
        "modeld {} at {addr} · node {} · {} · q quits\n\
         memory: models {} of budget {} · node {} available of {} · disk free {}\n\n",
        caps.agent_version,
        caps.node_id,
        caps.hostname,
        output::bytes(loaded.memory_used_bytes),
        output::bytes(loaded.memory_budget_bytes),
        output::bytes(memory.available_bytes),
        output::bytes(memory.total_bytes),
        output::bytes(caps.disk_free_bytes),
    );
    let mut models = output::table(&[
        "MODEL", "RUNTIME", "MEMORY", "RUNNING", "QUEUED", "REQUESTS", "TOKENS/S", "TTFT P50",
        "TTFT P95",
    ]);
    for m in &loaded.models {
        let recent = m.recent.unwrap_or_default();
        let memory = if m.proportional_memory_bytes > 0 {
            m.proportional_memory_bytes
        } else {
            m.actual_memory_bytes
        };
        models.add_row(vec![
            m.model_id.clone(),
            output::runtime_name(m.runtime),
            output::bytes(memory),
            m.in_flight_requests
                .saturating_sub(m.queued_requests)
                .to_string(),
            m.queued_requests.to_string(),
            recent.requests.to_string(),
            rate(recent.generation_tokens_per_second),
            seconds(recent.time_to_first_token_p50_seconds),
            seconds(recent.time_to_first_token_p95_seconds),
        ]);
    }
    if loaded.models.is_empty() {
        out.push_str("no model loaded\n");
    } else {
        out.push_str(&models.to_string());
        out.push('\n');
    }
    let active: Vec<_> = transfers
        .transfers
        .iter()
        .filter(|t| {
            !matches!(
                pb::TransferStage::try_from(t.stage),
                Ok(pb::TransferStage::Done
                    | pb::TransferStage::Failed
                    | pb::TransferStage::Cancelled)
            )
        })
        .collect();
    if !active.is_empty() {
        let mut t = output::table(&["TRANSFER", "MODEL", "STAGE", "DONE", "RATE"]);
        for x in active {
            let stage = pb::TransferStage::try_from(x.stage)
                .map(|s| output::short_enum(s.as_str_name(), "TRANSFER_STAGE_"))
                .unwrap_or_default();
            #[allow(clippy::cast_precision_loss)]
            let done = if x.bytes_total > 0 {
                format!("{:.0}%", x.bytes_done as f64 * 100.0 / x.bytes_total as f64)
            } else {
                output::bytes(x.bytes_done)
            };
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            let per_second = format!("{}/s", output::bytes(x.bytes_per_second as u64));
            t.add_row(vec![
                x.transfer_id.chars().take(8).collect(),
                x.model_id.clone(),
                stage,
                done,
                per_second,
            ]);
        }
        out.push('\n');
        out.push_str(&t.to_string());
        out.push('\n');
    }
    Ok(out)
}

/// Whether a key press asks to quit.
fn quits(key: &KeyEvent) -> bool {
    matches!(key.code, KeyCode::Char('q' | 'Q') | KeyCode::Esc)
        || (key.code == KeyCode::Char('c') && key.modifiers.contains(KeyModifiers::CONTROL))
}

pub async fn top(client: &Client, addr: &str, args: TopArgs) -> anyhow::Result<()> {
    if args.once || !std::io::stdout().is_terminal() {
        out!("{}", frame(client, addr).await?);
        return Ok(());
    }
    let _screen = Screen::enter()?;
    let interval = Duration::from_millis(args.interval_ms);
    loop {
        let text = match frame(client, addr).await {
            Ok(text) => text,
            Err(e) => format!("{addr}: {e:#}\n(retrying; q quits)\n"),
        };
        {
            let mut stdout = std::io::stdout().lock();
            execute!(
                stdout,
                cursor::MoveTo(0, 0),
                terminal::Clear(terminal::ClearType::All)
            )?;
            // Raw mode: a line feed does not return the carriage.
            stdout.write_all(text.replace('\n', "\r\n").as_bytes())?;
            stdout.flush()?;
        }
        // Keys are read on a blocking thread: crossterm's poll blocks.
        let pressed = tokio::task::spawn_blocking(move || -> std::io::Result<bool> {
            let until = std::time::Instant::now() + interval;
            loop {
                let left = until.saturating_duration_since(std::time::Instant::now());
                if left.is_zero() || !event::poll(left)? {
                    return Ok(false);
                }
                if let Event::Key(key) = event::read()?
                    && quits(&key)
                {
                    return Ok(true);
                }
            }
        })
        .await??;
        if pressed {
            return Ok(());
        }
    }
}
