//! socat as the classic ambassador image runs it: one process per port,
//! forking a child per connection.

use crate::peers::Fwd;
use crate::sys::Proc;
use anyhow::Result;
use std::time::Duration;

pub fn start(cpus: &str, fwds: &[Fwd]) -> Result<Vec<Proc>> {
    let mut v = Vec::new();
    for f in fwds {
        let args = vec![
            "-t".into(),
            "100000000".into(),
            format!("TCP4-LISTEN:{},bind=127.0.0.1,fork,reuseaddr", f.listen),
            format!("TCP4:127.0.0.1:{}", f.target),
        ];
        let mut p = Proc::spawn("socat", Some(cpus), "socat", &args)?;
        p.wait_ports(&[f.listen], Duration::from_secs(5))?;
        v.push(p);
    }
    Ok(v)
}
