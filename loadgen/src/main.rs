use clap::Parser;

fn main() {
    let args = loadgen::Args::parse();
    let config = match args.validate() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("loadgen: {e:#}");
            std::process::exit(2);
        }
    };
    match loadgen::run(&config) {
        Ok(report) => {
            if config.json {
                println!("{}", report.to_json());
            } else {
                print!("{}", report.table());
            }
            if !report.ok() {
                eprintln!("loadgen: FAILED: {}", report.failure_summary());
                std::process::exit(1);
            }
        }
        Err(e) => {
            eprintln!("loadgen: {e:#}");
            std::process::exit(1);
        }
    }
}
