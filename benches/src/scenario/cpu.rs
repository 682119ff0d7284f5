//! CPU time of this process and of the local servers it talks to, for figures that say where a
//! scenario's time went.

use std::time::Duration;

/// The CPU time this process's threads have used, user and system; not its children's.
pub fn this_process() -> Duration {
    use nix::sys::resource::{UsageWho, getrusage};
    getrusage(UsageWho::RUSAGE_SELF).map_or(Duration::ZERO, |usage| {
        let time = |t: nix::sys::time::TimeVal| {
            Duration::new(t.tv_sec().max(0) as u64, t.tv_usec().max(0) as u32 * 1000)
        };
        time(usage.user_time()) + time(usage.system_time())
    })
}

/// The CPU time used so far by every process of this machine whose command is `command`
/// (`beam.smp` for RabbitMQ, `postgres` for PostgreSQL), user and system, read from `/proc`;
/// `None` when no such process runs here, as when the server is on another machine.
pub fn processes_named(command: &str) -> Option<Duration> {
    use nix::unistd::{SysconfVar, sysconf};
    let ticks = sysconf(SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .and_then(|t| u64::try_from(t).ok())
        .filter(|&t| t > 0)?;
    let mut total = 0u64;
    let mut found = false;
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        // A process may end between listing and reading: skip it.
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // `PID (COMMAND) STATE …`; COMMAND may hold spaces and parentheses, so the fields
        // after it start at the last `)`.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        if stat[open + 1..close] != *command {
            continue;
        }
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        // utime and stime are fields 14 and 15 of the line, 12 and 13 after the command.
        let ticks_used = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
        if let (Some(user), Some(system)) = (ticks_used(11), ticks_used(12)) {
            total += user + system;
            found = true;
        }
    }
    found.then(|| Duration::from_micros(total * 1_000_000 / ticks))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_of_its_own_command_is_found_and_has_used_cpu() {
        let name = std::fs::read_to_string("/proc/self/comm").expect("comm");
        let burn = std::time::Instant::now();
        while burn.elapsed() < Duration::from_millis(30) {
            std::hint::black_box(0u64);
        }
        let used = processes_named(name.trim()).expect("this very process");
        assert!(used >= Duration::from_millis(10), "{used:?}");
        assert_eq!(processes_named("no-such-command-here"), None);
    }
}
