# syntax=docker/dockerfile:1
# A small static image: the binary (musl, statically linked, SQLite bundled) and CA certificates,
# running as an unprivileged user. Build: docker build -t rtc-leave-bridge .

FROM rust:1.95-alpine AS build
RUN apk add --no-cache musl-dev gcc binutils ca-certificates
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# Declared in Cargo.toml, so the manifest needs it even though the image does not build it.
COPY benches ./benches
RUN cargo build --release --locked --bin rtc-leave-bridge \
    && strip target/release/rtc-leave-bridge \
    && mkdir -p /out/data \
    && cp target/release/rtc-leave-bridge /out/

FROM scratch
COPY --from=build /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY --from=build /out/rtc-leave-bridge /usr/local/bin/rtc-leave-bridge
COPY --from=build --chown=65532:65532 /out/data /data
ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
    RTC_LEAVE_BRIDGE_DATA_DIR=/data \
    LIVEKIT_JWT_BIND=:8080
USER 65532:65532
EXPOSE 8080
VOLUME ["/data"]
# The binary checks itself, on whatever LIVEKIT_JWT_BIND says (":8080" included).
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["/usr/local/bin/rtc-leave-bridge", "healthcheck"]
ENTRYPOINT ["/usr/local/bin/rtc-leave-bridge"]
CMD ["serve"]
