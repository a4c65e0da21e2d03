//! mock-vllm: a vLLM stand-in for bbr-wasm's tests. See `mock-vllm --help`.

mod args;
mod cache;
mod openai;
mod server;
mod state;

use std::io::Write as _;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cfg = match args::parse(std::env::args().skip(1)) {
        Ok(args::Command::Run(cfg)) => *cfg,
        Ok(args::Command::Help) => {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(args::USAGE.as_bytes());
            let _ = out.flush();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            server::log(&format!(
                "mock-vllm: error: {e}\nRun 'mock-vllm --help' for usage."
            ));
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            server::log(&format!("mock-vllm: error: cannot start the runtime: {e}"));
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(server::run(cfg));
    // Do not wait for connection tasks still parked on keep-alive sockets.
    rt.shutdown_timeout(std::time::Duration::from_millis(200));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            server::log(&format!("mock-vllm: error: {e}"));
            ExitCode::FAILURE
        }
    }
}
