# The ambassador as a FROM-scratch image: one static binary, nothing else.
#
# Nothing is pulled (no registry is reachable where this is built). Build with
#     cargo xtask image                # --tag ambassador:latest by default
# which compiles the binary statically (RUSTFLAGS="-C target-feature=+crt-static",
# --target x86_64-unknown-linux-gnu, into target/static/), copies it to
# target/image-context/ambassador and runs
#     docker build -f Dockerfile target/image-context
# The build context is that one-file directory, not the repository (whose target/ is huge).
#
# Run (classic Docker links; see docs/walkthrough.md):
#     docker run -d --name redis_ambassador --link redis:redis ambassador
# The in-kernel engine (sockmap) needs `--cap-add SYS_ADMIN` on Docker 20.10 (which predates
# CAP_BPF); without it `--mode auto` logs `engine skipped engine=sockmap reason=...` and uses
# io_uring or epoll.
FROM scratch
COPY ambassador /ambassador
ENTRYPOINT ["/ambassador"]
CMD ["--mode", "auto"]
