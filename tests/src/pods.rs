//! The shipped manifests, played by a real container runtime: a kustomize
//! overlay written beside a test (over a `deploy/` base: this topology's
//! config, certificates and patches), rendered with `kubectl kustomize`, and
//! its workload's pod template played by `podman kube play` with the image
//! `cargo xtask image` built, in a namespace of the test's (a pod with
//! `hostNetwork` joins the network podman runs in).

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use serde::Deserialize;
use serde_yaml_ng::Value;

use crate::Netns;

/// The node the played pods run on, for the downward API.
pub const NODE_NAME: &str = "podman-node";

/// The image `cargo xtask image` builds for this version.
pub fn image() -> String {
    format!("localhost/dataplane:{}", env!("CARGO_PKG_VERSION"))
}

/// The repository's `deploy/` directory.
pub fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// Fails unless podman runs and has the image (no test is skipped for
/// it: `cargo xtask test` builds the image first).
pub fn require_image() -> Result<()> {
    let out = Command::new("podman").args(["image", "exists", &image()]).status();
    match out {
        Ok(s) if s.success() => Ok(()),
        Ok(_) => bail!("no image {}: run `cargo xtask image` (cargo xtask test does)", image()),
        Err(e) => bail!("podman does not run ({e}): `cargo xtask image` installs it"),
    }
}

/// Renders an overlay of `deploy/<base>` written into `dir/<name>`:
/// `kustomization` is the overlay's body after its `resources:` (which
/// names the base), `files` are written beside it.
pub fn render_overlay(
    dir: &Path,
    name: &str,
    base: &str,
    kustomization: &str,
    files: &[(&str, &str)],
) -> Result<Vec<Value>> {
    let overlay = dir.join(name);
    std::fs::create_dir_all(&overlay)?;
    // kustomize takes a base only by a relative path.
    let base_dir = deploy_dir().join(base).canonicalize()?;
    let up = overlay.canonicalize()?.components().count() - 1;
    let relative = format!("{}{}", "../".repeat(up), base_dir.strip_prefix("/")?.display());
    std::fs::write(
        overlay.join("kustomization.yaml"),
        format!(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - {relative}\n{kustomization}"
        ),
    )?;
    for (file, text) in files {
        std::fs::write(overlay.join(file), text)?;
    }
    let out = Command::new("kubectl").arg("kustomize").arg(&overlay).output().context("kubectl kustomize")?;
    ensure!(out.status.success(), "kubectl kustomize {name}: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout)?;
    let docs = serde_yaml_ng::Deserializer::from_str(&text)
        .map(Value::deserialize)
        .collect::<Result<Vec<Value>, _>>()?;
    Ok(docs.into_iter().filter(|d| !d.is_null()).collect())
}

/// The rendered object of `kind`.
pub fn find<'a>(docs: &'a [Value], kind: &str) -> Result<&'a Value> {
    docs.iter().find(|d| d["kind"] == kind).with_context(|| format!("no {kind} rendered"))
}

/// A workload's pod template as the Pod a controller would make of it
/// (podman plays Pod manifests), named `name`.
pub fn pod_of(workload: &Value, name: &str) -> Result<Value> {
    let template = &workload["spec"]["template"];
    ensure!(!template.is_null(), "{} has no pod template", workload["kind"].as_str().unwrap_or("?"));
    let mut metadata = template["metadata"].clone();
    metadata["name"] = Value::from(name);
    let pod = serde_yaml_ng::to_value(serde_yaml_ng::Mapping::from_iter([
        (Value::from("apiVersion"), Value::from("v1")),
        (Value::from("kind"), Value::from("Pod")),
        (Value::from("metadata"), metadata),
        (Value::from("spec"), template["spec"].clone()),
    ]))?;
    Ok(pod)
}

/// A pod played by podman in a namespace; taken down when dropped.
pub struct PlayedPod {
    pub name: String,
    /// Its (first) container's name in the manifest.
    container: String,
    file: PathBuf,
    ns: PathBuf,
}

impl PlayedPod {
    /// Plays `pod` (with its `configmap`) inside `ns`, files written to `dir`.
    pub fn play(ns: &Netns, dir: &Path, pod: &Value, configmap: &Value) -> Result<PlayedPod> {
        let name = pod["metadata"]["name"].as_str().context("pod name")?.to_owned();
        let file = dir.join(format!("{name}.pod.yaml"));
        let cm = dir.join(format!("{name}.configmap.yaml"));
        std::fs::write(&cm, serde_yaml_ng::to_string(configmap)?)?;
        let mut pod = pod.clone();
        // The kubelet resolves `spec.nodeName` for the downward API; podman
        // 4.3 cannot, so the pod gets the node's name as the kubelet would
        // give it.
        for c in pod["spec"]["containers"].as_sequence_mut().into_iter().flatten() {
            for e in c["env"].as_sequence_mut().into_iter().flatten() {
                if e["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
                    && let Some(m) = e.as_mapping_mut()
                {
                    m.remove("valueFrom");
                    m.insert(Value::from("value"), Value::from(NODE_NAME));
                }
            }
        }
        // podman 4.3 reads a pod's seccomp profile only from the annotation
        // that preceded the field; a kubelet reads the field.
        if pod["spec"]["securityContext"]["seccompProfile"]["type"] == "Unconfined" {
            pod["metadata"]["annotations"]["seccomp.security.alpha.kubernetes.io/pod"] =
                Value::from("unconfined");
        }
        if pod["spec"]["hostNetwork"] == true {
            // podman 4.3 refuses a port list on the host's network ("only
            // with bridge or slirp4netns"); Kubernetes takes it as
            // documentation, so leaving it out changes nothing.
            for c in pod["spec"]["containers"].as_sequence_mut().into_iter().flatten() {
                if let Some(m) = c.as_mapping_mut() {
                    m.remove("ports");
                }
            }
        }
        std::fs::write(&file, serde_yaml_ng::to_string(&pod)?)?;
        let container = pod["spec"]["containers"][0]["name"].as_str().context("container name")?.to_owned();
        let played = PlayedPod { name: name.clone(), container, file: file.clone(), ns: ns.path() };
        // A pod of this name left by a run that was killed would refuse the play.
        let _ = podman_in(&played.ns, &["pod", "rm", "--force", &name])?;
        let out = podman_in(&played.ns, &["kube", "play", "--configmap", path(&cm)?, path(&file)?])?;
        ensure!(
            out.status.success(),
            "podman kube play {name}: {}\n{}",
            text(&out),
            serde_yaml_ng::to_string(&pod).unwrap_or_default()
        );
        Ok(played)
    }

    /// The container's name in podman (`<pod>-<container>`).
    pub fn container(&self) -> String {
        format!("{}-{}", self.name, self.container)
    }

    /// The container's log (stdout and stderr).
    pub fn logs(&self) -> String {
        Command::new("podman")
            .args(["logs", &self.container()])
            .output()
            .map(|o| text(&o))
            .unwrap_or_default()
    }

    /// The container's state (`running`, `exited`, ...) and exit code.
    pub fn state(&self) -> Result<(String, i64)> {
        let out = Command::new("podman")
            .args(["inspect", "--format", "{{.State.Status}} {{.State.ExitCode}}", &self.container()])
            .output()?;
        ensure!(out.status.success(), "podman inspect: {}", text(&out));
        let s = String::from_utf8_lossy(&out.stdout);
        let (state, code) = s.trim().split_once(' ').context("state")?;
        Ok((state.to_owned(), code.parse()?))
    }

    /// Waits until the container has exited; returns its exit code.
    pub fn wait_exit(&self, within: Duration) -> Result<i64> {
        let start = Instant::now();
        loop {
            let (state, code) = self.state()?;
            if state == "exited" || state == "stopped" {
                return Ok(code);
            }
            ensure!(
                start.elapsed() < within,
                "{} still {state} after {within:?}: {}",
                self.name,
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for PlayedPod {
    fn drop(&mut self) {
        if let Ok(f) = path(&self.file) {
            let _ = podman_in(&self.ns, &["kube", "down", f]);
        }
    }
}

fn podman_in(ns: &Path, args: &[&str]) -> Result<std::process::Output> {
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    crate::run_in(ns, move || Command::new("podman").args(&args).output().context("running podman"))?
}

fn path(p: &Path) -> Result<&str> {
    p.to_str().context("non-UTF-8 path")
}

fn text(o: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}
