//! The layout shared by the kernel program (`ambassador-ebpf`) and the loader
//! (`ambassador::bpf`): map names, key and value types. Defined once, here.
//! (Placeholder: filled in by the sockmap work.)
#![no_std]
