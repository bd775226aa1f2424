//! The `modelctl` command line.

// First, so its `out!`/`outln!` macros are in scope in the modules below.
#[macro_use]
mod output;
mod audit;
mod bench;
mod fleet;
mod generate;
mod lifecycle;
mod models;
mod node;
mod storage;
mod top;

use clap::{CommandFactory as _, Parser, Subcommand, ValueEnum};
use modelctl::Client;

/// Operate modeld agents: a node's registry, storage, lifecycle and generation, and
/// the fleet controller.
#[derive(Debug, Parser)]
#[command(name = "modelctl", version)]
pub struct Cli {
    /// Agent address.
    #[arg(long, env = "MODELD_ADDR", default_value = modelctl::DEFAULT_ADDR, global = true)]
    addr: String,

    /// Bearer token for agents that require one (never printed).
    #[arg(long, env = "MODELD_TOKEN", global = true, hide_env_values = true)]
    token: Option<Token>,

    /// PEM CA bundle to check an https:// agent's certificate against [default: the
    /// system's roots].
    #[arg(long, env = "MODELD_TLS_CA", global = true)]
    tls_ca: Option<std::path::PathBuf>,

    /// PEM client certificate, for agents that require one (with --tls-key).
    #[arg(long, env = "MODELD_CLIENT_CERT", global = true)]
    tls_cert: Option<std::path::PathBuf>,

    /// PEM key of --tls-cert.
    #[arg(long, env = "MODELD_CLIENT_KEY", global = true)]
    tls_key: Option<std::path::PathBuf>,

    /// Output format: human-readable tables, or JSON (the proto3 JSON mapping, as
    /// grpcurl prints it) for scripts.
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Table, global = true)]
    output: Output,

    #[command(subcommand)]
    command: Command,
}

/// A token that never shows in debug output.
#[derive(Clone)]
struct Token(String);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(redacted)")
    }
}

impl std::str::FromStr for Token {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Token(s.to_owned()))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// This node: hardware, runtimes and resources.
    #[command(subcommand)]
    Node(node::NodeCommand),
    /// The model registry.
    #[command(subcommand)]
    Models(models::ModelsCommand),
    /// Scan model directories on the agent's host and register what is found.
    Scan(models::ScanArgs),
    /// Download a model's files onto the node (or join the download running), with
    /// progress per file.
    Pull(storage::PullArgs),
    /// Upload a model file from this machine to the node; resumes an interrupted push.
    Push(storage::PushArgs),
    /// Downloads in flight: list, pause, resume, cancel.
    Transfers(storage::TransfersArgs),
    /// Disk usage and the models stored on the node.
    Storage(storage::StorageArgs),
    /// Load a model into memory so it can generate.
    Load(lifecycle::LoadArgs),
    /// Free a loaded model's memory; running requests get a grace time to finish.
    Unload(lifecycle::UnloadArgs),
    /// Models in memory, with their runtime, memory and requests in flight.
    Ps,
    /// Who changed what on the node: every state-changing call and how it ended,
    /// newest first (needs the admin role).
    Audit(audit::AuditArgs),
    /// A model's lifecycle state and the history of its transitions.
    State(lifecycle::StateArgs),
    /// Follow lifecycle events; resumes by revision when the agent restarts.
    Watch(lifecycle::WatchArgs),
    /// Generate text with a model, streaming tokens as they come.
    Generate(generate::GenerateArgs),
    /// Chat with a model interactively; the conversation is kept between turns.
    Chat(generate::ChatArgs),
    /// Measure a loaded model through the full gRPC stream: prompt and generation
    /// tokens/s, time to first token, and aggregate tokens/s with concurrent streams.
    Bench(bench::BenchArgs),
    /// Show how a model's tokenizer splits a text.
    Tokenize(generate::TokenizeArgs),
    /// The fleet controller (--fleet-addr): devices, deployments and their status.
    Fleet(fleet::FleetArgs),
    /// A live view of the agent: loaded models with their recent tokens/s and time to
    /// first token, queues, memory and transfers; q quits.
    Top(top::TopArgs),
    /// Print a shell completion script: `source <(modelctl completions bash)`.
    Completions(CompletionsArgs),
    /// Print modelctl's man page, or write one page per command into a directory.
    Man(ManArgs),
}

#[derive(Debug, clap::Args)]
struct CompletionsArgs {
    shell: clap_complete::Shell,
}

#[derive(Debug, clap::Args)]
struct ManArgs {
    /// Write modelctl.1 and modelctl-COMMAND.1 for every command here instead.
    #[arg(long)]
    dir: Option<std::path::PathBuf>,
}

/// The command line's definition, as parsing, completions and the man page see it.
/// Every command takes negative numbers as values (`--temperature -1`), so an
/// out-of-range value reaches the agent, whose error names the field, instead of
/// being mistaken for a flag.
pub fn command() -> clap::Command {
    fn negatives(cmd: clap::Command) -> clap::Command {
        cmd.allow_negative_numbers(true).mut_subcommands(negatives)
    }
    negatives(Cli::command())
}

fn completions(args: &CompletionsArgs) {
    let mut script = Vec::new();
    clap_complete::generate(args.shell, &mut command(), "modelctl", &mut script);
    out!("{}", String::from_utf8_lossy(&script));
}

fn man(args: &ManArgs) -> anyhow::Result<()> {
    let cmd = command();
    match &args.dir {
        Some(dir) => {
            std::fs::create_dir_all(dir)?;
            clap_mangen::generate_to(cmd, dir)?;
        }
        None => {
            let mut page = Vec::new();
            clap_mangen::Man::new(cmd).render(&mut page)?;
            out!("{}", String::from_utf8_lossy(&page));
        }
    }
    Ok(())
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let tls = modelctl::Tls {
        ca: cli.tls_ca.clone(),
        cert: cli.tls_cert.clone(),
        key: cli.tls_key.clone(),
    };
    match &cli.command {
        Command::Completions(args) => {
            completions(args);
            return Ok(());
        }
        Command::Man(args) => return man(args),
        _ => {}
    }
    if let Command::Fleet(args) = cli.command {
        let token = cli.token.as_ref().map(|t| t.0.as_str());
        return fleet::run(args, &tls, token, cli.output).await;
    }
    let mut client = Client::connect_with_tls(&cli.addr, &tls).await?;
    if let Some(token) = &cli.token {
        client = client.with_token(&token.0)?;
    }
    match cli.command {
        Command::Node(cmd) => node::run(&client, cmd, cli.output).await,
        Command::Models(cmd) => models::run(&client, cmd, cli.output).await,
        Command::Scan(args) => models::scan(&client, args, cli.output).await,
        Command::Pull(args) => storage::pull(&client, args, cli.output).await,
        Command::Push(args) => storage::push(&client, args, cli.output).await,
        Command::Transfers(args) => {
            storage::transfers(
                &client,
                args.command.unwrap_or(storage::TransfersCommand::List),
                cli.output,
            )
            .await
        }
        Command::Storage(args) => storage::storage(&client, args, cli.output).await,
        Command::Load(args) => lifecycle::load(&client, args, cli.output).await,
        Command::Unload(args) => lifecycle::unload(&client, args, cli.output).await,
        Command::Ps => lifecycle::ps(&client, cli.output).await,
        Command::Audit(args) => audit::run(&client, args, cli.output).await,
        Command::State(args) => lifecycle::state(&client, args, cli.output).await,
        Command::Watch(args) => lifecycle::watch(&client, args, cli.output).await,
        Command::Generate(args) => generate::generate(&client, args, cli.output).await,
        Command::Chat(args) => generate::chat(&client, args).await,
        Command::Bench(args) => bench::bench(&client, args, cli.output).await,
        Command::Tokenize(args) => generate::tokenize(&client, args, cli.output).await,
        Command::Top(args) => top::top(&client, &cli.addr, args).await,
        Command::Fleet(_) | Command::Completions(_) | Command::Man(_) => {
            unreachable!("handled above")
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_command_line_definition_is_consistent() {
        super::command().debug_assert();
    }
}
