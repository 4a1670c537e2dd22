//! A plugin that misbehaves on command (`run_command`), for the sandbox tests: each command
//! is one attempt, and reports what it managed to do.

use axl_sdk::prelude::*;

#[derive(Default)]
struct Hostile;

/// `train` clashes with axl's own command, which wins.
const COMMANDS: [&str; 9] = [
    "train",
    "read_file",
    "connect",
    "spin",
    "allocate",
    "write_file",
    "panic",
    "clock",
    "http_get",
];

impl Plugin for Hostile {
    fn manifest(&self) -> Manifest {
        let mut manifest = manifest("hostile", "0.1.0", &[Hook::Commands, Hook::OnStepEnd]);
        manifest.provides.commands = COMMANDS.iter().map(|c| c.to_string()).collect();
        manifest
    }

    fn on_event(&mut self, event: &Event, _host: &mut dyn Host) -> Result<Control, PluginError> {
        if event.state.global_step == 2 {
            panic!("step two is unlucky");
        }
        Ok(Control::default())
    }

    fn run_command(&mut self, call: &CommandCall, host: &mut dyn Host) -> Result<(), PluginError> {
        let arg = call.args.first().cloned().unwrap_or_default();
        match call.name.as_str() {
            "read_file" => {
                let text = std::fs::read_to_string(&arg)
                    .map_err(|e| PluginError::new(format!("cannot read {arg}: {e}")))?;
                host.log(LogLevel::Info, &format!("read {arg}: {text}"));
                Ok(())
            }
            "connect" => {
                std::net::TcpStream::connect(arg.as_str())
                    .map_err(|e| PluginError::new(format!("cannot connect to {arg}: {e}")))?;
                host.log(LogLevel::Info, &format!("connected to {arg}"));
                Ok(())
            }
            "spin" => {
                let mut i: u64 = 0;
                loop {
                    i = std::hint::black_box(i.wrapping_add(1));
                }
            }
            "allocate" => {
                let mib: usize = arg.parse().unwrap_or(4096);
                let blocks: Vec<Vec<u8>> = (0..mib / 16).map(|_| vec![1u8; 16 << 20]).collect();
                host.log(
                    LogLevel::Info,
                    &format!("allocated {} MiB", blocks.len() * 16),
                );
                Ok(())
            }
            "write_file" => {
                std::fs::write(&arg, "written by a plugin")
                    .map_err(|e| PluginError::new(format!("cannot write {arg}: {e}")))?;
                host.log(LogLevel::Info, &format!("wrote {arg}"));
                Ok(())
            }
            "http_get" => {
                let response = host.http(&HttpRequest {
                    method: "GET".into(),
                    url: arg.clone(),
                    headers: vec![("x-probe".into(), "1".into())],
                    body: None,
                })?;
                host.log(
                    LogLevel::Info,
                    &format!("GET {arg}: {} {}", response.status, response.body),
                );
                Ok(())
            }
            "panic" => panic!("asked to panic"),
            "clock" => {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                host.log(LogLevel::Info, &format!("clock {now}"));
                Ok(())
            }
            other => Err(PluginError::new(format!("no command {other}"))),
        }
    }
}

axl_sdk::export_plugin!(Hostile);
