//! A server that looks remote to ublkd: a second network namespace, joined to the test's
//! by a veth pair, 10.77.0.1 on this side and 10.77.0.2 (`HOST`) on the other. A
//! connection to it has neither a loopback address nor ublkd's own at the far end, as one
//! to another machine has (the nbd target sends large payloads with SEND_ZC only there).
//! Needs the veth module and iproute2's `ip` in the VM (tests/run-vm-tests.sh).

use crate::run_ok;
use std::process::{Child, Command, Stdio};

/// The address of the namespace's end.
pub const HOST: &str = "10.77.0.2";
const IP: &str = "/usr/sbin/ip";
const NEAR: &str = "ublkzc0";
const FAR: &str = "ublkzc1";

/// The namespace, held by a process in it; it and the veth pair go when it is dropped.
pub struct RemoteNet {
    holder: Child,
}

impl RemoteNet {
    pub fn start() -> RemoteNet {
        // Left over from an earlier run that was killed: gone with this.
        del_near();
        let holder = Command::new("unshare")
            .args(["-n", "sleep", "3600"])
            .stdin(Stdio::null())
            .spawn()
            .expect("unshare -n");
        let net = RemoteNet { holder };
        let pid = net.holder.id().to_string();
        // The holder is in its own namespace once /proc says so.
        let own = std::fs::read_link("/proc/self/ns/net").unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::fs::read_link(format!("/proc/{pid}/ns/net"))
            .ok()
            .as_ref()
            == Some(&own)
        {
            assert!(
                std::time::Instant::now() < deadline,
                "unshare -n did not take"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        run_ok(
            IP,
            &["link", "add", NEAR, "type", "veth", "peer", "name", FAR],
        );
        run_ok(IP, &["link", "set", FAR, "netns", &pid]);
        run_ok(IP, &["addr", "add", "10.77.0.1/24", "dev", NEAR]);
        run_ok(IP, &["link", "set", NEAR, "up"]);
        for args in [
            &["addr", "add", &format!("{HOST}/24"), "dev", FAR][..],
            &["link", "set", FAR, "up"],
            &["link", "set", "lo", "up"],
        ] {
            let mut a = vec!["-t", &pid, "-n", IP];
            a.extend_from_slice(args);
            run_ok("nsenter", &a);
        }
        net
    }

    /// The arguments that run `program args...` in the namespace (with `nsenter`, which
    /// execs it: the child is the program).
    pub fn wrap(&self, program: &str, args: &[String]) -> Vec<String> {
        let mut a: Vec<String> = ["-t", &self.holder.id().to_string(), "-n", program]
            .iter()
            .map(|s| s.to_string())
            .collect();
        a.extend_from_slice(args);
        a
    }
}

impl Drop for RemoteNet {
    fn drop(&mut self) {
        let _ = self.holder.kill();
        let _ = self.holder.wait();
        // Gone with the namespace, as a rule.
        del_near();
    }
}

fn del_near() {
    let _ = Command::new(IP)
        .args(["link", "del", NEAR])
        .stderr(Stdio::null())
        .status();
}
