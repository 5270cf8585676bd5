//! The `afm-vl` command line.

mod commands;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use commands::{Context, NotBuilt};

/// afm-vl: Apple AFM-2025-style vision-language pipeline on libtorch.
///
/// Describe images, generate text, evaluate benchmark folders, inspect and convert checkpoints.
#[derive(Parser, Debug)]
#[command(name = "afm-vl", version, about, long_about = None, propagate_version = true)]
struct Cli {
    /// Where to run: auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps.
    #[arg(long, global = true, default_value = "auto")]
    device: String,
    /// More logging (-v info, -vv debug, -vvv trace).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// CPU threads for libtorch, 1 to 4 × the cores (default: all cores).
    #[arg(long, global = true, value_name = "N", value_parser = commands::parse_threads)]
    threads: Option<usize>,
    /// Only errors on stderr.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Describe one or more images.
    Describe(commands::describe::Args),
    /// Generate text from a prompt with a text model.
    Generate(commands::generate::GenerateArgs),
    /// Chat interactively with a text model.
    Chat(commands::generate::ChatArgs),
    /// Caption accuracy of a vision-language checkpoint on held-out generated scenes.
    #[command(name = "eval-demo")]
    EvalDemo(commands::eval_demo::Args),
    /// Evaluate a model on MMLU / MMMLU / MGSM / JSONL benchmark folders.
    Eval(commands::eval::Args),
    /// Show a model's parameters, layer layout, KV-cache and weight sizes.
    Inspect(commands::inspect::Args),
    /// Benchmarks that print a table (text decoding, tiler).
    Bench(commands::bench::Args),
    /// Convert checkpoints (GGUF → safetensors + tokenizer.json).
    Convert(commands::convert::Args),
    /// Tile an image as the vision encoder sees it and write the tensor.
    Tile(commands::tile::Args),
    /// Training: LoRA adapters on a frozen text model.
    Train(commands::train::Args),
    /// Quantize a text model (packed 2/4/8-bit or mixed; rtn or k-means palettes).
    Quantize(commands::quantize::Args),
}

/// Parse the command line. A usage error is one line on stderr and exit code 1 (help and
/// version print as usual). Every option that takes a value accepts a leading `-`, so that a
/// negative number reaches its parser and is refused with the option's range instead of clap's
/// `-- -1` advice.
fn parse_cli() -> Result<Cli, ExitCode> {
    use clap::{CommandFactory, FromArgMatches};
    fn negatives(cmd: clap::Command) -> clap::Command {
        let cmd = cmd.mut_args(|a| {
            if a.get_action().takes_values() {
                a.allow_negative_numbers(true)
            } else {
                a
            }
        });
        cmd.mut_subcommands(negatives)
    }
    let matches = negatives(Cli::command()).try_get_matches();
    let err = match matches.and_then(|m| Cli::from_arg_matches(&m)) {
        Ok(cli) => return Ok(cli),
        Err(e) => e,
    };
    use clap::error::ErrorKind;
    if matches!(
        err.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        err.exit();
    }
    eprintln!(
        "{}",
        commands::one_line_clap_error(&err.render().to_string())
    );
    Err(ExitCode::from(1))
}

fn init_logging(verbose: u8, quiet: bool) {
    use tracing_subscriber::EnvFilter;
    let default = if quiet {
        "error"
    } else {
        match verbose {
            0 => "warn",
            1 => "info",
            2 => "debug",
            _ => "trace",
        }
    };
    let filter = EnvFilter::try_from_env("AFM_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .init();
}

fn main() -> ExitCode {
    commands::output::restore_sigpipe();
    let cli = match parse_cli() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    init_logging(cli.verbose, cli.quiet);
    if let Some(n) = cli.threads {
        // parse_threads bounds it to 1..=4 × cores, far below i32::MAX.
        tch::set_num_threads(n as i32);
    }
    let ctx = Context {
        device: cli.device.clone(),
        quiet: cli.quiet,
    };
    // Every command checks --device, including those that never touch it (inspect): a typo
    // or an absent GPU is an error, not silently ignored. `auto` is resolved where it is used.
    if let Err(e) = ctx.check_device() {
        eprintln!(
            "error: --device {}: {}",
            cli.device,
            commands::error_line(&e)
        );
        return ExitCode::from(1);
    }
    let result = match cli.command {
        Command::Describe(a) => commands::describe::run(&ctx, a),
        Command::Generate(a) => commands::generate::run_generate(&ctx, a),
        Command::Chat(a) => commands::generate::run_chat(&ctx, a),
        Command::Eval(a) => commands::eval::run(&ctx, a),
        Command::EvalDemo(a) => commands::eval_demo::run(&ctx, a),
        Command::Inspect(a) => commands::inspect::run(&ctx, a),
        Command::Bench(a) => commands::bench::run(&ctx, a),
        Command::Convert(a) => commands::convert::run(&ctx, a),
        Command::Tile(a) => commands::tile::run(&ctx, a),
        Command::Train(a) => commands::train::run(&ctx, a),
        Command::Quantize(a) => commands::quantize::run(&ctx, a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            if let Some(nb) = err.downcast_ref::<NotBuilt>() {
                eprintln!("afm-vl: {nb}");
                return ExitCode::from(2);
            }
            if commands::output::is_broken_pipe(&err) {
                // The reader went away (`| head`): end quietly, as `cat` does.
                return ExitCode::SUCCESS;
            }
            eprintln!("error: {}", commands::error_line(&err));
            ExitCode::from(1)
        }
    }
}
