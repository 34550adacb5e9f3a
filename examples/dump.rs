//! Writes the guest content of an image (with its backing chain, as qemu-img opens it) to
//! standard output, or to a file given as the second argument.
//!
//! ```text
//! cargo run --example dump -- disk.qcow2 disk.raw
//! ```

use qcow2kit::chain::{open, probe_file, OpenOptions};
use std::io::Write;
use std::path::Path;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(src) = args.first() else {
        eprintln!("usage: dump IMAGE [OUT]");
        std::process::exit(2);
    };
    let path = Path::new(src);
    let img = open(path, probe_file(path)?, &OpenOptions::qemu_compatible())?;
    let dev = img.device;
    let mut out: Box<dyn Write> = match args.get(1) {
        Some(o) => Box::new(std::fs::File::create(o)?),
        None => Box::new(std::io::stdout().lock()),
    };
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < dev.size() {
        let n = (dev.size() - off).min(buf.len() as u64) as usize;
        dev.read_at(&mut buf[..n], off)?;
        out.write_all(&buf[..n])?;
        off += n as u64;
    }
    Ok(())
}
