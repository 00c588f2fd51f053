//! The operator's own commands (a PDU script, a vendor tool): run with `sh -c`, the node in the
//! environment (`CORRAL_MAC`, `CORRAL_NODE`). `status` prints `on` or `off`.

use super::{failed, PowerDriver, PowerError, PowerResult, PowerState};
use crate::domain::Mac;

pub struct Command {
    pub on: String,
    pub off: String,
    pub status: Option<String>,
    pub boot_network: Option<String>,
    pub mac: Mac,
    pub name: Option<String>,
}

impl Command {
    fn run(&self, what: &str, script: &str, extra: &[(&str, &str)]) -> PowerResult<String> {
        let mut c = std::process::Command::new("sh");
        c.arg("-c").arg(script);
        c.env("CORRAL_MAC", self.mac.to_string());
        c.env("CORRAL_NODE", self.name.as_deref().unwrap_or(""));
        for (k, v) in extra {
            c.env(k, v);
        }
        let out = c.output().map_err(failed)?;
        if !out.status.success() {
            return Err(failed(format!(
                "{what} command failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl PowerDriver for Command {
    fn kind(&self) -> &'static str {
        "command"
    }
    fn on(&self) -> PowerResult<()> {
        self.run("on", &self.on, &[]).map(|_| ())
    }
    fn off(&self, hard: bool) -> PowerResult<()> {
        self.run(
            "off",
            &self.off,
            &[("CORRAL_HARD", if hard { "1" } else { "0" })],
        )
        .map(|_| ())
    }
    fn cycle(&self) -> PowerResult<()> {
        self.off(true)?;
        self.on()
    }
    fn status(&self) -> PowerResult<PowerState> {
        let Some(s) = &self.status else {
            return Ok(PowerState::Unknown);
        };
        let out = self.run("status", s, &[])?;
        Ok(match out.trim().to_ascii_lowercase().as_str() {
            "on" => PowerState::On,
            "off" => PowerState::Off,
            _ => PowerState::Unknown,
        })
    }
    fn boot_network_once(&self) -> PowerResult<()> {
        match &self.boot_network {
            Some(s) => self.run("boot_network", s, &[]).map(|_| ()),
            None => Err(PowerError::Unsupported("command")),
        }
    }
}
