//! `vessel factory ...`: the cache of booted, paused sandbox VMs, for the
//! CLI (see `runtime_api::factory`).
//!
//! Each cached VM has an owner process of its own (`vessel __cached`),
//! detached as a sandbox's owner is, so the VMs outlive `factory init`.
//! It boots the VM, pauses it once its agent has announced itself, says
//! `ready NAME` and answers its control socket (`.factory/NAME/control.sock`,
//! 0600, peer uid checked). A create or run with `--factory` sends it
//! `claim CONFIG`: it makes the sandbox from its VM
//! (`Sandbox::create` with a factory holding that VM), answers `ready`
//! (or `error WHY`), starts a replacement owner, and from then on is the
//! sandbox's owner, as `__own` is. It answers one claim: a second create
//! finds its socket gone and tries the next VM. An owner whose VM dies
//! removes it, starts a replacement and exits.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use runtime_api::factory::{
    self, CacheConfig, CacheFile, CachedState, CachedVm, FactoryError, TemplateFile, RECORD_VERSION,
};
use runtime_api::{Factory, HypervisorKind, Sandbox, SandboxConfig, Store};

/// A cached VM's control socket, in its directory.
const CONTROL_SOCKET: &str = "control.sock";
/// How often an idle owner looks at its VM.
const WATCH_EVERY: Duration = Duration::from_millis(200);
/// How long a client may take to send its claim, and how long it may be.
const CLAIM_READ_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_CLAIM: u64 = 1 << 20;

/// What `factory init` takes.
#[derive(Args, Debug, Clone)]
pub(crate) struct InitArgs {
    /// Keep N booted, paused VMs.
    #[arg(long, value_name = "N")]
    pub(crate) cache: Option<usize>,
    /// Make a VM template in DIR (a new directory; builtin hypervisor
    /// only): each create restores a VM from its snapshot.
    #[arg(long, value_name = "DIR", conflicts_with = "cache")]
    pub(crate) template: Option<PathBuf>,
    /// The guest image directory (default: the one in the cache directory).
    #[arg(long, visible_alias = "guest-image", value_name = "DIR")]
    pub(crate) image: Option<PathBuf>,
    /// The hypervisor: builtin or qemu-tcg (default: chosen for this host).
    #[arg(long)]
    pub(crate) hypervisor: Option<HypervisorKind>,
    /// vCPUs of each VM (a create must ask for as many).
    #[arg(long, default_value_t = 1)]
    pub(crate) cpus: u8,
    /// Guest memory of each VM in MiB (a create must ask for as much).
    #[arg(long, default_value_t = 256)]
    pub(crate) memory: u64,
    /// Hotplug slots of each VM: a sandbox from the cache takes one for
    /// its root and keeps `--hotplug-slots` of its own (4 by default).
    #[arg(long, default_value_t = 5, value_name = "N")]
    pub(crate) hotplug_slots: u8,
}

/// Starts a `vessel __cached` owner process; its stderr goes to a log in
/// the factory's directory, whose path is returned.
fn spawn_owner(store: &Store, wait: bool) -> anyhow::Result<(std::process::Child, PathBuf)> {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    let log = factory::factory_dir(store).join(format!(".owner-{}-{nanos:08x}.log", std::process::id()));
    let stderr = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let child = Command::new(std::env::current_exe()?)
        .arg("--root")
        .arg(store.root())
        .arg("__cached")
        .stdin(Stdio::null())
        .stdout(if wait { Stdio::piped() } else { Stdio::null() })
        .stderr(stderr)
        .spawn()
        .context("starting a cached VM's owner process")?;
    Ok((child, log))
}

/// Starts owners until the cache `cache.json` describes is full again
/// (paused, booting and claimed VMs count), without waiting for them.
fn refill(store: &Store) {
    let Ok(Some(file)) = factory::read_cache_file(store) else { return };
    let live = factory::list(store).map_or(0, |all| {
        all.iter()
            .filter(|v| matches!(v.state, CachedState::Paused | CachedState::Booting | CachedState::Claiming))
            .count()
    });
    for _ in live..file.size {
        if let Err(e) = spawn_owner(store, false) {
            tracing::warn!(error = %format!("{e:#}"), "cannot start a replacement cached VM");
        }
    }
}

/// `vessel factory init`: writes the cache's description and starts an
/// owner per VM; returns once every VM is paused (or one failed, in which
/// case none is left).
pub(crate) fn init(store: &Store, args: &InitArgs) -> anyhow::Result<ExitCode> {
    if factory::read_cache_file(store)?.is_some() || factory::read_template_file(store)?.is_some() {
        bail!("a factory exists already under {}: `vessel factory destroy` first", store.root().display());
    }
    let hypervisor = args.hypervisor.unwrap_or_else(HypervisorKind::detect);
    if args.template.is_some() {
        // Refused before an image is looked for or built.
        if hypervisor != HypervisorKind::Builtin {
            return Err(FactoryError::TemplateHypervisor(hypervisor).into());
        }
    }
    let config = CacheConfig {
        hypervisor,
        guest_image: crate::guest_image(args.image.as_deref())?.canonicalize()?,
        vcpus: args.cpus,
        memory_mib: args.memory,
        hotplug_slots: args.hotplug_slots,
        boot_timeout_s: 240,
    };
    if let Some(dir) = &args.template {
        let dir = std::path::absolute(dir).with_context(|| format!("the template directory {}", dir.display()))?;
        factory::make_template(&dir, &config)?;
        if let Err(e) = factory::write_template_file(store, &TemplateFile { version: RECORD_VERSION, dir: dir.clone() })
        {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e.into());
        }
        println!("{}", dir.display());
        return Ok(ExitCode::SUCCESS);
    }
    let size = args.cache.context("give --cache N or --template DIR")?;
    if !(1..=factory::MAX_CACHE).contains(&size) {
        return Err(FactoryError::Size(size).into());
    }
    factory::sweep(store)?;
    factory::write_cache_file(store, &CacheFile { version: RECORD_VERSION, config, size })?;
    let mut owners = Vec::new();
    for _ in 0..size {
        match spawn_owner(store, true) {
            Ok(owner) => owners.push(owner),
            Err(e) => {
                factory::destroy(store, Duration::from_secs(10))?;
                return Err(e);
            }
        }
    }
    let mut names = Vec::new();
    let mut failures = Vec::new();
    for (mut child, log) in owners {
        let mut line = String::new();
        if let Some(out) = child.stdout.take() {
            let _ = BufReader::new(out).read_line(&mut line);
        }
        match line.trim().strip_prefix("ready ") {
            Some(name) => names.push(name.to_string()),
            None => {
                let _ = child.wait();
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                failures.push(text.trim().lines().last().unwrap_or("the owner ended without a word").to_string());
            }
        }
        let _ = std::fs::remove_file(&log);
    }
    if let Some(first) = failures.first() {
        factory::destroy(store, Duration::from_secs(10))?;
        remove_logs(store);
        bail!("{} of {size} cached VMs did not boot: {first}", failures.len());
    }
    for name in names {
        println!("{name}");
    }
    Ok(ExitCode::SUCCESS)
}

/// `vessel factory status`: the cache's description, and each VM.
pub(crate) fn status(store: &Store) -> anyhow::Result<ExitCode> {
    match factory::read_cache_file(store)? {
        Some(file) => {
            let c = &file.config;
            println!(
                "cache of {} on {}: {} vCPU(s), {} MiB, {} hotplug slots, image {}",
                file.size,
                c.hypervisor,
                c.vcpus,
                c.memory_mib,
                c.hotplug_slots,
                c.guest_image.display()
            );
        }
        None => match factory::read_template_file(store)? {
            Some(file) => {
                let c = factory::read_template(&file.dir)?.config;
                println!(
                    "template in {} on {}: {} vCPU(s), {} MiB, {} hotplug slots, image {}",
                    file.dir.display(),
                    c.hypervisor,
                    c.vcpus,
                    c.memory_mib,
                    c.hotplug_slots,
                    c.guest_image.display()
                );
                return Ok(ExitCode::SUCCESS);
            }
            None => println!("no factory (vessel factory init --cache N, or --template DIR)"),
        },
    }
    println!("{:<20} {:<40} {:>10} {:>8} {:>8}", "VM", "STATE", "AGE", "OWNER", "VM-PID");
    let now = runtime_api::state::now_unix_ms();
    for vm in factory::list(store)? {
        let (age, owner, vm_pid) = match &vm.record {
            Some(r) => (
                format!("{:.1}s", now.saturating_sub(r.created_unix_ms) as f64 / 1000.0),
                r.owner_pid.to_string(),
                r.vm_pid.map_or("-".into(), |p| p.to_string()),
            ),
            None => ("-".into(), "-".into(), "-".into()),
        };
        println!("{:<20} {:<40} {age:>10} {owner:>8} {vm_pid:>8}", vm.name, vm.state.to_string());
    }
    Ok(ExitCode::SUCCESS)
}

/// Removes the owners' logs from the factory's directory, and the
/// directory once nothing else is left in it.
fn remove_logs(store: &Store) {
    let dir = factory::factory_dir(store);
    for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
        if entry.file_name().to_string_lossy().starts_with(".owner-") {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    let _ = std::fs::remove_dir(&dir);
}

/// `vessel factory destroy`: ends every cached VM and its owner, removes
/// their directories, the cache's description and the owners' logs.
/// Sandboxes made from the cache are left alone.
pub(crate) fn destroy(store: &Store) -> anyhow::Result<ExitCode> {
    if let Some(file) = factory::read_template_file(store)? {
        // Sandboxes restored from it map its memory file privately: they
        // keep what they mapped.
        if file.dir.join(factory::TEMPLATE_RECORD).is_file() {
            std::fs::remove_dir_all(&file.dir).with_context(|| format!("removing {}", file.dir.display()))?;
        }
        std::fs::remove_file(factory::factory_dir(store).join(factory::TEMPLATE_FILE))?;
        remove_logs(store);
        println!("removed the VM template in {}", file.dir.display());
        return Ok(ExitCode::SUCCESS);
    }
    // No replacement may start from here on.
    let _ = std::fs::remove_file(factory::factory_dir(store).join(factory::CACHE_FILE));
    let ended = factory::destroy(store, Duration::from_secs(60))?;
    remove_logs(store);
    println!("ended {} cached VM(s)", ended.len());
    Ok(ExitCode::SUCCESS)
}

/// Asks the owners of paused VMs, one after another, to make sandbox
/// `config` from theirs. True once one did (its owner is the sandbox's
/// owner now); false when none was ready. An owner that refuses the
/// config says why, which is the answer.
pub(crate) fn claim(store: &Store, config: &SandboxConfig) -> anyhow::Result<bool> {
    let _ = factory::sweep(store);
    let request = format!("claim {}\n", serde_json::to_string(config)?);
    let paused: Vec<String> =
        factory::list(store)?.into_iter().filter(|v| v.state == CachedState::Paused).map(|v| v.name).collect();
    for name in paused {
        let socket = factory::factory_dir(store).join(&name).join(CONTROL_SOCKET);
        // Claimed by another create, or gone, since the listing.
        let Ok(mut conn) = UnixStream::connect(&socket) else { continue };
        if conn.write_all(request.as_bytes()).is_err() {
            continue;
        }
        let mut answer = String::new();
        if BufReader::new(&conn).read_line(&mut answer).is_err() {
            continue;
        }
        match answer.trim() {
            "ready" => {
                tracing::info!(id = %config.id, vm = %name, "the sandbox took a cached VM");
                return Ok(true);
            }
            "taken" | "" => continue,
            other => bail!("{}", other.strip_prefix("error ").unwrap_or(other)),
        }
    }
    Ok(false)
}

/// `vessel __cached`: boots one VM for the cache, then waits for a claim
/// (see the module docs).
pub(crate) fn own_cached(store: &Store) -> anyhow::Result<ExitCode> {
    // Detached from the terminal and its signals.
    // SAFETY: setsid has no preconditions; it fails harmlessly if this
    // process leads a group already.
    unsafe { libc::setsid() };
    let file = factory::read_cache_file(store)?.context("no factory: `vessel factory init --cache N`")?;
    let mut vm = Some(CachedVm::boot(store, &file.config)?);
    let name = vm.as_ref().map(|v| v.name().to_string()).unwrap_or_default();
    let socket = factory::factory_dir(store).join(&name).join(CONTROL_SOCKET);
    let listener =
        devices::host_socket::bind_private(&socket).with_context(|| format!("listening on {}", socket.display()))?;
    listener.set_nonblocking(true)?;
    // init may be gone: its pipe then refuses the line, which is harmless
    // (println! would panic, and take the VM down with this process).
    let _ = writeln!(std::io::stdout(), "ready {name}").and_then(|()| std::io::stdout().flush());
    loop {
        let conn = match listener.accept() {
            Ok((conn, _)) => conn,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if let Some(why) = vm.as_mut().and_then(CachedVm::dead) {
                    tracing::warn!(vm = %name, why = %why, "the cached VM died; replacing it");
                    drop(vm.take());
                    refill(store);
                    return Ok(ExitCode::SUCCESS);
                }
                std::thread::sleep(WATCH_EVERY);
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        if !devices::host_socket::peer_is_same_user(&conn).unwrap_or(false) {
            continue;
        }
        conn.set_nonblocking(false)?;
        // A client that stalls or sends without end is dropped: this loop
        // also watches the VM, and answers the next claim.
        conn.set_read_timeout(Some(CLAIM_READ_TIMEOUT))?;
        let mut line = String::new();
        if BufReader::new((&conn).take(MAX_CLAIM)).read_line(&mut line).is_err() {
            continue;
        }
        let mut conn = conn;
        let Some(json) = line.trim().strip_prefix("claim ") else {
            let _ = conn.write_all(format!("error unknown request {:?}\n", line.trim()).as_bytes());
            continue;
        };
        let config: SandboxConfig = match serde_json::from_str(json) {
            Ok(config) => config,
            Err(e) => {
                let _ = conn.write_all(format!("error the sandbox config: {e}\n").as_bytes());
                continue;
            }
        };
        let Some(cached) = vm.take() else { break };
        if let Some(why) = cached.record().config.mismatch(&config) {
            let _ =
                conn.write_all(format!("error sandbox {:?} cannot take a cached VM: {why}\n", config.id).as_bytes());
            vm = Some(cached);
            continue;
        }
        // One claim only: later creates find no socket and try another VM.
        drop(listener);
        let _ = devices::host_socket::remove_socket(&socket);
        let holding = Factory::holding(store, cached);
        let created = Sandbox::create(store, config, Some(&holding));
        drop(holding);
        // Whatever happened, this VM has left the cache.
        refill(store);
        return match created {
            Ok(sandbox) => crate::lifecycle::serve_owner(store, sandbox, || conn.write_all(b"ready\n")),
            Err(e) => {
                let why = runtime_api::error_chain(&e).replace('\n', " ");
                let _ = conn.write_all(format!("error {why}\n").as_bytes());
                Err(e.into())
            }
        };
    }
    Ok(ExitCode::SUCCESS)
}

/// The template's factory for a create or run with `--factory`, when
/// `factory init --template` made one; None for a cache, or no factory.
pub(crate) fn template(store: &Store) -> anyhow::Result<Option<Factory>> {
    match factory::read_template_file(store)? {
        Some(file) => Ok(Some(Factory::template(&file.dir)?)),
        None => Ok(None),
    }
}

/// Whether `factory init --template` made the factory.
pub(crate) fn has_template(store: &Store) -> bool {
    matches!(factory::read_template_file(store), Ok(Some(_)))
}
