use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use modelctl::{Client, ClientError};
use modeld_proto::v1 as pb;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio_stream::StreamExt;

use super::Output;
use super::output::{self, bytes, short_enum};

#[derive(Debug, Args)]
pub struct PullArgs {
    id: String,
}

#[derive(Debug, Args)]
pub struct PushArgs {
    id: String,
    /// The local file to upload.
    file: PathBuf,
    /// Which of the model's files this is; defaults to its only file, or the local
    /// file's name.
    #[arg(long)]
    file_name: Option<String>,
}

#[derive(Debug, Args)]
pub struct TransfersArgs {
    /// What to do; lists the transfers when omitted.
    #[command(subcommand)]
    pub command: Option<TransfersCommand>,
}

#[derive(Debug, Subcommand)]
pub enum TransfersCommand {
    /// List transfers.
    #[command(alias = "ls")]
    List,
    Pause {
        transfer_id: String,
    },
    Resume {
        transfer_id: String,
    },
    /// Stop a transfer and delete its partial files.
    Cancel {
        transfer_id: String,
    },
}

#[derive(Debug, Args)]
pub struct StorageArgs {
    #[command(subcommand)]
    command: Option<StorageCommand>,
}

#[derive(Debug, Subcommand)]
enum StorageCommand {
    /// Delete a model's stored files (blobs other models use are kept).
    Rm { id: String },
}

fn stage(s: i32) -> String {
    pb::TransferStage::try_from(s)
        .map(|s| short_enum(s.as_str_name(), "TRANSFER_STAGE_"))
        .unwrap_or_else(|_| "-".into())
}

fn rate_eta(rate: f64, eta: f64) -> String {
    let rate = if rate > 0.0 {
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let r = rate as u64;
        format!("{}/s", bytes(r))
    } else {
        String::new()
    };
    let eta = if eta > 0.0 {
        format!(
            " eta {}",
            indicatif::HumanDuration(Duration::from_secs_f64(eta))
        )
    } else {
        String::new()
    };
    format!("{rate}{eta}")
}

pub async fn pull(client: &Client, a: PullArgs, out: Output) -> anyhow::Result<()> {
    let mut stream = client
        .storage()
        .pull(pb::PullRequest {
            model_id: a.id.clone(),
        })
        .await
        .map_err(ClientError::from)?
        .into_inner();
    let bars = MultiProgress::new();
    let style =
        ProgressStyle::with_template("{prefix:<32!} {bar:30} {bytes:>10}/{total_bytes:<10} {msg}")
            .context("progress style")?;
    let mut by_file: HashMap<String, ProgressBar> = HashMap::new();
    let mut last = None;
    loop {
        let msg = match stream.next().await {
            None => break,
            Some(Ok(m)) => m,
            Some(Err(status)) => {
                bars.clear().ok();
                return Err(ClientError::from(status).into());
            }
        };
        let Some(p) = msg.progress else { continue };
        if out == Output::Json {
            outln!("{}", serde_json::to_string(&p)?);
        } else {
            for f in &p.files {
                let bar = by_file.entry(f.name.clone()).or_insert_with(|| {
                    let b = bars.add(ProgressBar::new(f.bytes_total));
                    b.set_style(style.clone());
                    b.set_prefix(f.name.clone());
                    b
                });
                bar.set_length(f.bytes_total.max(f.bytes_done));
                bar.set_position(f.bytes_done);
                let attempt = if f.attempt > 1 {
                    format!(" attempt {}", f.attempt)
                } else {
                    String::new()
                };
                bar.set_message(format!(
                    "{} {}{attempt}",
                    stage(f.stage),
                    rate_eta(f.bytes_per_second, f.eta_seconds)
                ));
            }
        }
        last = Some(p);
    }
    for b in by_file.values() {
        b.finish();
    }
    let last = last.context("the agent sent no progress")?;
    if out == Output::Table {
        outln!(
            "{} {} ({})",
            a.id,
            stage(last.stage),
            bytes(last.bytes_total)
        );
    }
    if last.stage() != pb::TransferStage::Done {
        bail!(
            "transfer ended in stage {}: {}",
            stage(last.stage),
            last.error
        );
    }
    Ok(())
}

pub async fn push(client: &Client, a: PushArgs, out: Output) -> anyhow::Result<()> {
    let model = client.get_model(&a.id).await?;
    let spec = model.spec.unwrap_or_default();
    let local_name = a
        .file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let file = match &a.file_name {
        Some(n) => spec.files.iter().find(|f| &f.name == n),
        None if spec.files.len() == 1 => spec.files.first(),
        None => spec.files.iter().find(|f| f.name == local_name),
    }
    .with_context(|| {
        format!(
            "which of {}'s files is this? pass --file-name (one of: {})",
            a.id,
            spec.files
                .iter()
                .map(|f| f.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )
    })?
    .clone();
    let len = tokio::fs::metadata(&a.file)
        .await
        .with_context(|| format!("reading {}", a.file.display()))?
        .len();
    if len != file.size_bytes {
        bail!(
            "{} is {len} bytes but {}'s {:?} is declared as {} bytes",
            a.file.display(),
            a.id,
            file.name,
            file.size_bytes
        );
    }
    let offset = client
        .storage()
        .get_push_offset(pb::GetPushOffsetRequest {
            model_id: a.id.clone(),
            file_name: file.name.clone(),
        })
        .await
        .map_err(ClientError::from)?
        .into_inner()
        .offset;
    let mut f = tokio::fs::File::open(&a.file).await?;
    f.seek(std::io::SeekFrom::Start(offset)).await?;
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix:<32!} {bar:30} {bytes:>10}/{total_bytes:<10} {bytes_per_sec} eta {eta}",
        )
        .context("progress style")?,
    );
    bar.set_prefix(file.name.clone());
    bar.set_position(offset);
    if offset > 0 && out == Output::Table {
        bar.println(format!("resuming at byte {offset}"));
    }
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let header = pb::PushRequest {
        message: Some(pb::push_request::Message::Header(pb::PushHeader {
            model_id: a.id.clone(),
            file_name: file.name.clone(),
            size_bytes: file.size_bytes,
            sha256: file.sha256.clone(),
            offset,
        })),
    };
    let reader_bar = bar.clone();
    let reader = tokio::spawn(async move {
        if tx.send(header).await.is_err() {
            return Ok::<(), std::io::Error>(());
        }
        loop {
            let mut buf = vec![0u8; 1 << 20];
            let n = f.read(&mut buf).await?;
            if n == 0 {
                return Ok(());
            }
            buf.truncate(n);
            reader_bar.inc(n as u64);
            if tx
                .send(pb::PushRequest {
                    message: Some(pb::push_request::Message::Chunk(buf)),
                })
                .await
                .is_err()
            {
                return Ok(());
            }
        }
    });
    let resp = client
        .storage()
        .push(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(ClientError::from);
    reader.await??;
    bar.finish();
    let resp = resp?.into_inner();
    if out == Output::Json {
        return output::json(&resp);
    }
    outln!(
        "{}: {} {} (sha256 {})",
        a.id,
        if resp.stored_new {
            "stored"
        } else {
            "already stored"
        },
        bytes(resp.size_bytes),
        resp.sha256
    );
    Ok(())
}

pub async fn transfers(client: &Client, cmd: TransfersCommand, out: Output) -> anyhow::Result<()> {
    let mut storage = client.storage();
    let progress = match cmd {
        TransfersCommand::List => {
            let mut all = Vec::new();
            let mut req = pb::ListTransfersRequest::default();
            loop {
                let page = storage
                    .list_transfers(req.clone())
                    .await
                    .map_err(ClientError::from)?
                    .into_inner();
                all.extend(page.transfers);
                if page.next_page_token.is_empty() {
                    break;
                }
                req.page_token = page.next_page_token;
            }
            if out == Output::Json {
                return output::json(&serde_json::json!({ "transfers": all }));
            }
            let mut t = output::table(&[
                "TRANSFER",
                "MODEL",
                "STAGE",
                "DONE",
                "TOTAL",
                "RATE / ETA",
                "ERROR",
            ]);
            for p in &all {
                t.add_row(vec![
                    p.transfer_id.clone(),
                    p.model_id.clone(),
                    stage(p.stage),
                    bytes(p.bytes_done),
                    bytes(p.bytes_total),
                    rate_eta(p.bytes_per_second, p.eta_seconds),
                    p.error.clone(),
                ]);
            }
            outln!("{t}");
            return Ok(());
        }
        TransfersCommand::Pause { transfer_id } => {
            storage
                .pause_transfer(pb::PauseTransferRequest { transfer_id })
                .await
                .map_err(ClientError::from)?
                .into_inner()
                .progress
        }
        TransfersCommand::Resume { transfer_id } => {
            storage
                .resume_transfer(pb::ResumeTransferRequest { transfer_id })
                .await
                .map_err(ClientError::from)?
                .into_inner()
                .progress
        }
        TransfersCommand::Cancel { transfer_id } => {
            storage
                .cancel_transfer(pb::CancelTransferRequest {
                    transfer_id: transfer_id.clone(),
                })
                .await
                .map_err(ClientError::from)?;
            outln!("cancelled {transfer_id}");
            return Ok(());
        }
    };
    let p = progress.unwrap_or_default();
    if out == Output::Json {
        return output::json(&p);
    }
    outln!("{} {}: {}", p.transfer_id, p.model_id, stage(p.stage));
    Ok(())
}

pub async fn storage(client: &Client, a: StorageArgs, out: Output) -> anyhow::Result<()> {
    let mut storage = client.storage();
    if let Some(StorageCommand::Rm { id }) = a.command {
        let resp = storage
            .delete_stored(pb::DeleteStoredRequest {
                model_id: id.clone(),
            })
            .await
            .map_err(ClientError::from)?
            .into_inner();
        if out == Output::Json {
            return output::json(&resp);
        }
        outln!(
            "deleted the stored files of {id}; freed {}",
            bytes(resp.freed_bytes)
        );
        return Ok(());
    }
    let usage = storage
        .get_usage(pb::GetUsageRequest {})
        .await
        .map_err(ClientError::from)?
        .into_inner();
    let stored = storage
        .list_stored(pb::ListStoredRequest {
            page_size: 1000,
            ..Default::default()
        })
        .await
        .map_err(ClientError::from)?
        .into_inner();
    if out == Output::Json {
        return output::json(&serde_json::json!({ "usage": usage, "stored": stored.models }));
    }
    let quota = if usage.quota_bytes == 0 {
        "none".to_owned()
    } else {
        bytes(usage.quota_bytes)
    };
    outln!(
        "used {} (partial downloads {}), free {}, quota {quota}",
        bytes(usage.used_bytes),
        bytes(usage.partial_bytes),
        bytes(usage.free_bytes)
    );
    let mut t = output::table(&["MODEL", "SIZE", "COMPLETE", "FILES", "EVICTABLE"]);
    for m in &stored.models {
        t.add_row(vec![
            m.model_id.clone(),
            bytes(m.size_bytes),
            if m.complete {
                "yes".into()
            } else {
                "no".into()
            },
            m.blobs.len().to_string(),
            // What a pull that does not fit may remove, least recently used first.
            if m.evictable {
                "yes".into()
            } else {
                format!("no: {}", m.kept_because)
            },
        ]);
    }
    outln!("{t}");
    Ok(())
}
