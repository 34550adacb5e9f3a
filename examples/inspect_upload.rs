//! Inspects an upload as it streams to its destination: `cargo run --release --example
//! inspect_upload -- FILE [DECLARED_FORMAT]` copies FILE to nowhere through an
//! [`InspectReader`], then prints the verdict under the strict policy, the time taken and the
//! most bytes the inspector kept at once.

use qcow2kit::ops::inspect::{InspectReader, Policy};
use qcow2kit::Format;
use std::io::Read;
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let path = args
        .next()
        .ok_or("usage: inspect_upload FILE [DECLARED_FORMAT]")?;
    let declared = args
        .next()
        .map(|n| Format::from_name(&n).ok_or(format!("unknown format '{n}'")))
        .transpose()?;
    let t = Instant::now();
    let mut r = InspectReader::new(std::fs::File::open(&path)?);
    let mut buf = vec![0u8; 1 << 20];
    let mut peak = 0;
    loop {
        let n = r.read(&mut buf)?;
        peak = peak.max(r.kept_bytes());
        if n == 0 {
            break;
        }
    }
    let elapsed = t.elapsed();
    let ins = r.inspection().ok_or("the stream did not end")?;
    let mut policy = Policy::strict();
    policy.declared_format = declared;
    let violations = ins.check(&policy);
    println!(
        "{path}: {} bytes, format {}, virtual size {:?}",
        r.position(),
        ins.format(),
        ins.virtual_size()
    );
    for v in &violations {
        println!("  {v}");
    }
    println!(
        "{} in {:.3} s, at most {peak} bytes kept",
        if violations.is_empty() {
            "accepted"
        } else {
            "refused"
        },
        elapsed.as_secs_f64()
    );
    Ok(())
}
