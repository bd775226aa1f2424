//! A real `modeld-fleet` controller process, device profiles for the agents that dial
//! into it, and deployments built in code.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use modeld_proto::fleet::v1 as fpb;

use crate::{Client, Log, binary, spawn_logged};

pub struct Controller {
    child: Child,
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
    args: Vec<String>,
    log: Log,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller")
            .field("addr", &self.addr)
            .finish()
    }
}

impl Controller {
    /// Starts a controller on `listen` (a free port when `None`) keeping its state in
    /// `data_dir`.
    pub fn start(data_dir: &Path, listen: Option<SocketAddr>) -> Controller {
        Controller::start_with(data_dir, listen, Vec::new())
    }

    /// Like [`Controller::start`], with more flags (TLS, tokens).
    pub fn start_with(
        data_dir: &Path,
        listen: Option<SocketAddr>,
        args: Vec<String>,
    ) -> Controller {
        let mut cmd = Command::new(binary("modeld-fleet"));
        cmd.arg("--listen")
            .arg(listen.map_or_else(|| "127.0.0.1:0".to_owned(), |a| a.to_string()))
            .arg("--data-dir")
            .arg(data_dir)
            .args(&args)
            .stdout(Stdio::null());
        let (child, addr, log) =
            spawn_logged(cmd, "modeld-fleet listening", Duration::from_secs(30));
        Controller {
            child,
            addr,
            data_dir: data_dir.to_path_buf(),
            args,
            log,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn client(
        &self,
    ) -> fpb::fleet_service_client::FleetServiceClient<modelctl::Transport> {
        Client::connect(&self.url())
            .await
            .expect("connect to the controller")
            .fleet()
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// SIGKILL: no shutdown code runs.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Kills the controller and starts a new one on the same address and state.
    pub fn restart(mut self) -> Controller {
        self.kill9();
        Controller::start_with(&self.data_dir.clone(), Some(self.addr), self.args.clone())
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes a device profile (TOML) into `dir` and returns its path.
pub fn profile(dir: &Path, name: &str, toml: &str) -> PathBuf {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, toml).expect("write the device profile");
    path
}

/// One model of a deployment.
pub fn model(spec: modeld_proto::v1::ModelSpec, state: fpb::WantedState) -> fpb::DeploymentModel {
    fpb::DeploymentModel {
        spec: Some(spec),
        state: state as i32,
        load_options: Some(modeld_proto::v1::LoadOptions {
            context_length: 512,
            ..Default::default()
        }),
        min_generation_tokens_per_second: 0.0,
    }
}

/// Polls the controller until `check` accepts the deployment's status, or panics
/// with the last status after `timeout`.
pub async fn wait_status(
    controller: &Controller,
    name: &str,
    timeout: Duration,
    what: &str,
    check: impl Fn(&fpb::DeploymentStatus) -> bool,
) -> fpb::DeploymentStatus {
    let deadline = Instant::now() + timeout;
    let mut fleet = controller.client().await;
    loop {
        let status = fleet
            .get_deployment_status(fpb::GetDeploymentStatusRequest {
                name: name.to_owned(),
            })
            .await
            .expect("deployment status")
            .into_inner()
            .deployments
            .into_iter()
            .next()
            .expect("the deployment's status");
        if check(&status) {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; last status: {status:#?}\ncontroller log:\n{}",
            controller.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The phase of `model` on `device` in `status`.
pub fn phase(status: &fpb::DeploymentStatus, device: &str, model: &str) -> Option<fpb::ModelPhase> {
    status
        .devices
        .iter()
        .find(|d| d.device_id == device && d.model_id == model)
        .and_then(|d| fpb::ModelPhase::try_from(d.phase).ok())
}
