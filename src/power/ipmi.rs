//! IPMI over LAN (lanplus) through `ipmitool`: chassis power and the next boot device. The password goes
//! through the environment (`-E`), never the command line that `ps` shows.

use super::{failed, PowerDriver, PowerResult, PowerState, Secret};

pub struct Ipmi {
    host: String,
    port: u16,
    secret: Secret,
    cipher_suite: u8,
}

impl Ipmi {
    pub fn new(host: &str, port: u16, secret: Secret, cipher_suite: u8) -> Ipmi {
        Ipmi {
            host: host.to_string(),
            port,
            secret,
            cipher_suite,
        }
    }

    fn run(&self, args: &[&str]) -> PowerResult<String> {
        let port = self.port.to_string();
        let suite = self.cipher_suite.to_string();
        let out = std::process::Command::new("ipmitool")
            .args([
                "-I",
                "lanplus",
                "-H",
                &self.host,
                "-p",
                &port,
                "-U",
                &self.secret.user,
                "-C",
                &suite,
                "-E",
                "-N",
                "2",
                "-R",
                "3",
            ])
            .args(args)
            .env("IPMI_PASSWORD", &self.secret.password)
            .output()
            .map_err(|e| failed(format!("ipmitool: {e}")))?;
        if !out.status.success() {
            return Err(failed(format!(
                "ipmitool {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl PowerDriver for Ipmi {
    fn kind(&self) -> &'static str {
        "ipmi"
    }
    fn on(&self) -> PowerResult<()> {
        self.run(&["chassis", "power", "on"]).map(|_| ())
    }
    fn off(&self, hard: bool) -> PowerResult<()> {
        self.run(&["chassis", "power", if hard { "off" } else { "soft" }])
            .map(|_| ())
    }
    fn cycle(&self) -> PowerResult<()> {
        self.run(&["chassis", "power", "cycle"]).map(|_| ())
    }
    fn status(&self) -> PowerResult<PowerState> {
        let out = self.run(&["chassis", "power", "status"])?;
        Ok(if out.contains("is on") {
            PowerState::On
        } else if out.contains("is off") {
            PowerState::Off
        } else {
            PowerState::Unknown
        })
    }
    fn boot_network_once(&self) -> PowerResult<()> {
        self.run(&["chassis", "bootdev", "pxe"]).map(|_| ())
    }
}
