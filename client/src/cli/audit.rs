//! `modelctl audit`: who changed what on the node, newest first (admin only).

use clap::Args;
use modelctl::{Client, ClientError};
use modeld_proto::v1 as pb;

use super::{Output, output};

#[derive(Debug, Args)]
pub struct AuditArgs {
    /// Entries to show, newest first (1–1000).
    #[arg(long, default_value_t = 50)]
    limit: i32,
}

pub async fn run(client: &Client, a: AuditArgs, out: Output) -> anyhow::Result<()> {
    let resp = client
        .node()
        .list_audit(pb::ListAuditRequest { limit: a.limit })
        .await
        .map_err(ClientError::from)?
        .into_inner();
    if out == Output::Json {
        return output::json(&resp);
    }
    let mut t = output::table(&["#", "TIME", "WHO", "ROLE", "CALL", "RESULT", "FROM"]);
    for e in &resp.entries {
        let time = e
            .time
            .as_ref()
            .and_then(|t| u64::try_from(t.seconds).ok())
            .map(|secs| {
                httpdate::fmt_http_date(
                    std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs),
                )
            })
            .unwrap_or_default();
        let result = match (e.code, e.reason.as_str()) {
            (0, _) => "ok".to_owned(),
            (code, "") => format!("{:?}", tonic::Code::from(code)),
            (code, reason) => format!("{:?} {reason}", tonic::Code::from(code)),
        };
        t.add_row(vec![
            e.sequence.to_string(),
            time,
            e.identity.clone(),
            e.role.clone(),
            e.method.rsplit('/').next().unwrap_or_default().to_owned(),
            result,
            e.peer.clone(),
        ]);
    }
    outln!("{t}");
    Ok(())
}
