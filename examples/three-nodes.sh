#!/usr/bin/env bash
# A 3-node demo on loopback: an anchor that seeds, a second anchor, and a
# client that requires both to agree before it serves a path to Nix.
# Needs: nixpfs on PATH, Nix (nix-build), run as a user who can build.
set -euo pipefail
W=$(mktemp -d); cd "$W"
cat > hello.nix <<'NIX'
{ nonce ? "demo" }: builtins.derivation { name = "hello-nixpfs"; system = builtins.currentSystem;
  builder = "/bin/sh"; args = [ "-c" "echo hello-${nonce} > $out" ]; }
NIX
OUT=$(nix-build hello.nix --no-out-link)

for n in anchor-a anchor-b root; do nixpfs key generate --name "$n" --out "$n.key" > "$n.pub"; done
nixpfs --data-dir a anchor sign "$OUT" --key anchor-a.key
nixpfs --data-dir a anchor publish --key anchor-a.key --out set-a.jsonl
nixpfs --data-dir b anchor sign "$OUT" --key anchor-b.key
nixpfs --data-dir b anchor publish --key anchor-b.key --out set-b.jsonl

nixpfs registry init --root-key "$(cat root.pub)" --threshold 1 --out registry.json
nixpfs registry add-anchor registry.json --name anchor-a --key "$(cat anchor-a.pub)" --source "$W/set-a.jsonl"
nixpfs registry add-anchor registry.json --name anchor-b --key "$(cat anchor-b.pub)" --source "$W/set-b.jsonl"
nixpfs registry sign registry.json --key root.key

nixpfs --data-dir a serve --listen 127.0.0.1:18481 & A=$!
trap 'kill $A ${C:-} 2>/dev/null || true' EXIT
sleep 1
PEER=$(nixpfs --data-dir a id | awk '/^listen:/{print $2; exit}')/p2p/$(nixpfs --data-dir a id | awk '/^peer id:/{print $3}')
nixpfs --data-dir c serve --listen 127.0.0.1:18483 --registry "$W/registry.json" --registry-root-key "$(cat root.pub)" --require 2 --peer "$PEER" & C=$!
sleep 2
nixpfs --data-dir c anchors sync
KEY=$(nixpfs --data-dir c id | awk '/^gateway key:/{print $3}')
nix copy --from http://127.0.0.1:18483 --to "local?root=$W/store" --option trusted-public-keys "$KEY" "$OUT"
echo "substituted $OUT through the client gateway, bytes fetched from node a over IPFS"
