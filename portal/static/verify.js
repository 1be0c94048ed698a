/*
 * portal/static/verify.js -- checks a contributor can run in their own browser, trusting neither the
 * portal nor its operator: everything is recomputed here and read from a chain node the user may pick.
 * Plain JavaScript, no libraries, no build step. Load it with <script src="/static/verify.js" defer>.
 *
 * JavaScript API (window.PortalVerify):
 *   keccak256(bytes: Uint8Array) -> Uint8Array(32)      Ethereum's Keccak-256 (padding 0x01, not SHA3's 0x06)
 *   sha256(bytes: Uint8Array) -> Promise<Uint8Array>    crypto.subtle when the page is a secure context,
 *                                                       else a built-in implementation
 *   normalize(text) -> string                           = registry/contribution_content.normalize
 *   contributionId(text) -> Promise<hex>                sha256 (64 lower-case hex digits, no 0x) of the
 *                                                       normalized text's UTF-8 bytes
 *   inclusion(args) -> Promise<{ok, steps}>             args: {text, contributionId, proof: [hex32, ...],
 *                                                       datanetId, version, registry, rpcUrl}
 *   payout(args) -> Promise<{ok, steps}>                args: {rpcUrl, txHash, batchId, settler, token,
 *                                                       payee, amount (decimal string, base units)}
 *   run(element) -> Promise<{ok, steps}>                runs the check an element describes (see below)
 *   bind(root = document)                               wires every check element under root (done on load)
 *   bytesToHex, hexToBytes, utf8                        helpers
 * steps: [{label, detail, ok}], in order; a check stops at its first failed step. `ok` of the result is
 * true only when every step passed. Details carry the actual hex values, so anyone can repeat a step with
 * another client (`cast keccak`, `cast call`, `cast receipt`, ...). The checks never throw: a bad argument,
 * an unreachable node or a malformed answer is a failed step with a readable detail.
 *
 * DOM contract (what the portal's templates render):
 *   <section data-verify="inclusion" data-args='{"contributionId": "...", "proof": [...], ...}'>
 *     <textarea class="verify-text">the contribution's text</textarea>    (optional; inclusion only)
 *     <button class="verify-run">Verify</button>                          (optional)
 *     <ol class="verify-steps"></ol>
 *     <p class="verify-verdict"></p>
 *   </section>
 *   - data-verify is "inclusion" or "payout"; data-args is the args object above as JSON. For inclusion,
 *     the textarea's current value (the user may edit it) replaces args.text.
 *   - A click on .verify-run runs the check (the button is disabled meanwhile). Without a button the check
 *     runs once when bound.
 *   - .verify-steps gets one <li data-ok="true|false"> per step, holding
 *     <span class="verify-label">label</span> and <pre class="verify-detail">detail</pre> (text only).
 *   - .verify-verdict: data-state="running" while the check runs, then text and data-state become exactly
 *     "verified" or "failed". The element also gets data-state, and a "verify:done" event (detail = the
 *     result) is dispatched on it.
 */
(function () {
  "use strict";

  // ---------------------------------------------------------------------------------------------
  // Bytes and hex

  function utf8(text) {
    return new TextEncoder().encode(String(text));
  }

  function bytesToHex(bytes) {
    let out = "";
    for (let i = 0; i < bytes.length; i++) out += (bytes[i] < 16 ? "0" : "") + bytes[i].toString(16);
    return out;
  }

  // Hex (with or without 0x) to bytes; `size` (optional) is the exact byte length required.
  function hexToBytes(hex, size, what) {
    const name = what || "value";
    if (typeof hex !== "string") throw new Error(`${name} must be a hex string, got ${typeof hex}`);
    const digits = hex.startsWith("0x") || hex.startsWith("0X") ? hex.slice(2) : hex;
    if (digits.length % 2 !== 0 || !/^[0-9a-fA-F]*$/.test(digits)) {
      throw new Error(`${name} is not hex: ${JSON.stringify(hex)}`);
    }
    if (size !== undefined && digits.length !== 2 * size) {
      throw new Error(`${name} must be ${size} bytes (${2 * size} hex digits), got ${digits.length / 2}: ${hex}`);
    }
    const out = new Uint8Array(digits.length / 2);
    for (let i = 0; i < out.length; i++) out[i] = parseInt(digits.substr(2 * i, 2), 16);
    return out;
  }

  function concatBytes(...parts) {
    const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
    let at = 0;
    for (const p of parts) {
      out.set(p, at);
      at += p.length;
    }
    return out;
  }

  function compareBytes(a, b) {
    for (let i = 0; i < Math.min(a.length, b.length); i++) if (a[i] !== b[i]) return a[i] - b[i];
    return a.length - b.length;
  }

  const hex0x = (bytes) => "0x" + bytesToHex(bytes);

  // ---------------------------------------------------------------------------------------------
  // Keccak-256 (Keccak-f[1600], rate 136 bytes, Ethereum's padding 0x01 ... 0x80).
  // A lane (64 bits) is two 32-bit words: state[2i] = low half, state[2i + 1] = high half, lane i = x + 5y.

  // Round constants from the LFSR of the Keccak reference (x^8 + x^6 + x^5 + x^4 + 1), as [low, high].
  const ROUND_CONSTANTS = (function () {
    const out = [];
    let r = 1;
    for (let round = 0; round < 24; round++) {
      let lo = 0;
      let hi = 0;
      for (let j = 0; j < 7; j++) {
        const bit = r & 1;
        r = r & 0x80 ? ((r << 1) ^ 0x71) & 0xff : (r << 1) & 0xff;
        if (bit) {
          const position = (1 << j) - 1; // 0, 1, 3, 7, 15, 31, 63
          if (position < 32) lo |= 1 << position;
          else hi |= 1 << (position - 32);
        }
      }
      out.push([lo >>> 0, hi >>> 0]);
    }
    return out;
  })();

  // rho offsets and pi destinations: lane (x, y) is rotated by ROTATION[x + 5y] and moved to lane
  // (y, 2x + 3y mod 5), i.e. index DESTINATION[x + 5y].
  const ROTATION = new Array(25).fill(0);
  const DESTINATION = new Array(25).fill(0);
  (function () {
    let x = 1;
    let y = 0;
    for (let t = 0; t < 24; t++) {
      ROTATION[x + 5 * y] = (((t + 1) * (t + 2)) / 2) % 64;
      const nextY = (2 * x + 3 * y) % 5;
      x = y;
      y = nextY;
    }
    for (let x0 = 0; x0 < 5; x0++) {
      for (let y0 = 0; y0 < 5; y0++) DESTINATION[x0 + 5 * y0] = y0 + 5 * ((2 * x0 + 3 * y0) % 5);
    }
  })();

  function keccakF(state) {
    const c = new Uint32Array(10);
    const b = new Uint32Array(50);
    for (let round = 0; round < 24; round++) {
      // theta
      for (let x = 0; x < 5; x++) {
        let lo = 0;
        let hi = 0;
        for (let y = 0; y < 25; y += 5) {
          lo ^= state[2 * (x + y)];
          hi ^= state[2 * (x + y) + 1];
        }
        c[2 * x] = lo;
        c[2 * x + 1] = hi;
      }
      for (let x = 0; x < 5; x++) {
        const left = (x + 4) % 5;
        const right = (x + 1) % 5;
        const rLo = c[2 * right];
        const rHi = c[2 * right + 1];
        const dLo = c[2 * left] ^ ((rLo << 1) | (rHi >>> 31));
        const dHi = c[2 * left + 1] ^ ((rHi << 1) | (rLo >>> 31));
        for (let y = 0; y < 25; y += 5) {
          state[2 * (x + y)] ^= dLo;
          state[2 * (x + y) + 1] ^= dHi;
        }
      }
      // rho and pi
      for (let i = 0; i < 25; i++) {
        const lo = state[2 * i];
        const hi = state[2 * i + 1];
        const n = ROTATION[i];
        const to = 2 * DESTINATION[i];
        if (n === 0) {
          b[to] = lo;
          b[to + 1] = hi;
        } else if (n < 32) {
          b[to] = (lo << n) | (hi >>> (32 - n));
          b[to + 1] = (hi << n) | (lo >>> (32 - n));
        } else if (n === 32) {
          b[to] = hi;
          b[to + 1] = lo;
        } else {
          const m = n - 32;
          b[to] = (hi << m) | (lo >>> (32 - m));
          b[to + 1] = (lo << m) | (hi >>> (32 - m));
        }
      }
      // chi
      for (let y = 0; y < 25; y += 5) {
        for (let x = 0; x < 5; x++) {
          const i = 2 * (x + y);
          const i1 = 2 * (((x + 1) % 5) + y);
          const i2 = 2 * (((x + 2) % 5) + y);
          state[i] = b[i] ^ (~b[i1] & b[i2]);
          state[i + 1] = b[i + 1] ^ (~b[i1 + 1] & b[i2 + 1]);
        }
      }
      // iota
      state[0] ^= ROUND_CONSTANTS[round][0];
      state[1] ^= ROUND_CONSTANTS[round][1];
    }
  }

  const RATE = 136;

  function keccak256(bytes) {
    if (!(bytes instanceof Uint8Array)) throw new TypeError("keccak256 takes a Uint8Array");
    const state = new Uint32Array(50);
    const blocks = Math.floor(bytes.length / RATE) + 1; // padding always adds at least one byte
    const padded = new Uint8Array(blocks * RATE);
    padded.set(bytes);
    padded[bytes.length] ^= 0x01;
    padded[padded.length - 1] ^= 0x80;
    for (let offset = 0; offset < padded.length; offset += RATE) {
      for (let i = 0; i < RATE / 4; i++) {
        const at = offset + 4 * i;
        state[i] ^= padded[at] | (padded[at + 1] << 8) | (padded[at + 2] << 16) | (padded[at + 3] << 24);
      }
      keccakF(state);
    }
    const out = new Uint8Array(32);
    for (let i = 0; i < 32; i++) out[i] = (state[i >> 2] >>> (8 * (i & 3))) & 0xff;
    return out;
  }

  // ---------------------------------------------------------------------------------------------
  // SHA-256: crypto.subtle where the browser offers it (secure contexts: https, 127.0.0.1, localhost),
  // else this implementation (a portal served over plain http elsewhere has no crypto.subtle).

  const SHA256_K = (function () {
    // first 32 bits of the fractional parts of the cube roots of the first 64 primes
    const out = [];
    for (let n = 2; out.length < 64; n++) {
      let prime = true;
      for (let d = 2; d * d <= n; d++) if (n % d === 0) prime = false;
      if (prime) out.push(Math.floor((Math.cbrt(n) % 1) * 2 ** 32) >>> 0);
    }
    return out;
  })();
  const SHA256_H0 = (function () {
    const out = [];
    for (let n = 2; out.length < 8; n++) {
      let prime = true;
      for (let d = 2; d * d <= n; d++) if (n % d === 0) prime = false;
      if (prime) out.push(Math.floor((Math.sqrt(n) % 1) * 2 ** 32) >>> 0);
    }
    return out;
  })();

  function sha256Fallback(bytes) {
    const bitLength = bytes.length * 8;
    const total = Math.ceil((bytes.length + 9) / 64) * 64;
    const padded = new Uint8Array(total);
    padded.set(bytes);
    padded[bytes.length] = 0x80;
    const view = new DataView(padded.buffer);
    view.setUint32(total - 8, Math.floor(bitLength / 2 ** 32));
    view.setUint32(total - 4, bitLength >>> 0);
    const h = SHA256_H0.slice();
    const w = new Uint32Array(64);
    const rotr = (v, n) => (v >>> n) | (v << (32 - n));
    for (let offset = 0; offset < total; offset += 64) {
      for (let i = 0; i < 16; i++) w[i] = view.getUint32(offset + 4 * i);
      for (let i = 16; i < 64; i++) {
        const s0 = rotr(w[i - 15], 7) ^ rotr(w[i - 15], 18) ^ (w[i - 15] >>> 3);
        const s1 = rotr(w[i - 2], 17) ^ rotr(w[i - 2], 19) ^ (w[i - 2] >>> 10);
        w[i] = (w[i - 16] + s0 + w[i - 7] + s1) >>> 0;
      }
      let [a, b, c, d, e, f, g, k] = h;
      for (let i = 0; i < 64; i++) {
        const t1 = (k + (rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25)) + ((e & f) ^ (~e & g)) + SHA256_K[i] + w[i]) >>> 0;
        const t2 = ((rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c))) >>> 0;
        k = g;
        g = f;
        f = e;
        e = (d + t1) >>> 0;
        d = c;
        c = b;
        b = a;
        a = (t1 + t2) >>> 0;
      }
      [a, b, c, d, e, f, g, k].forEach((v, i) => (h[i] = (h[i] + v) >>> 0));
    }
    const out = new Uint8Array(32);
    const outView = new DataView(out.buffer);
    h.forEach((v, i) => outView.setUint32(4 * i, v));
    return out;
  }

  async function sha256(bytes) {
    if (globalThis.crypto && globalThis.crypto.subtle) {
      return new Uint8Array(await globalThis.crypto.subtle.digest("SHA-256", bytes));
    }
    return sha256Fallback(bytes);
  }

  // ---------------------------------------------------------------------------------------------
  // Contribution text (registry/contribution_content.py)

  // The characters Python's str.isspace() accepts, i.e. what str.strip()/rstrip() remove.
  const PY_SPACE = "\\t\\n\\v\\f\\r\\x1c-\\x1f \\x85\\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000";
  const TRAILING_SPACE = new RegExp(`[${PY_SPACE}]+$`);
  const LEADING_SPACE = new RegExp(`^[${PY_SPACE}]+`);

  function normalize(text) {
    const lines = String(text).normalize("NFC").replace(/\r\n/g, "\n").replace(/\r/g, "\n").split("\n");
    const joined = lines.map((line) => line.replace(TRAILING_SPACE, "")).join("\n");
    return joined.replace(/^\n+/, "").replace(/\n+$/, "").replace(LEADING_SPACE, "").replace(TRAILING_SPACE, "");
  }

  async function contributionId(text) {
    return bytesToHex(await sha256(utf8(normalize(text))));
  }

  // ---------------------------------------------------------------------------------------------
  // JSON-RPC, straight from the browser to the node the user names

  const RPC_TIMEOUT_MS = 15000;
  let rpcId = 0;

  async function rpc(url, method, params) {
    const controller = new AbortController();
    const timer = setTimeout(() => controller.abort(), RPC_TIMEOUT_MS);
    let response;
    try {
      response = await fetch(url, {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ jsonrpc: "2.0", id: ++rpcId, method, params }),
        signal: controller.signal,
        cache: "no-store",
        credentials: "omit",
      });
    } catch (error) {
      const why = controller.signal.aborted ? `no answer within ${RPC_TIMEOUT_MS / 1000} s` : error.message;
      throw new Error(`could not reach the chain node at ${url} (${method}): ${why}`);
    } finally {
      clearTimeout(timer);
    }
    if (!response.ok) throw new Error(`the chain node at ${url} answered HTTP ${response.status} to ${method}`);
    let reply;
    try {
      reply = await response.json();
    } catch (error) {
      throw new Error(`the chain node at ${url} answered ${method} with something that is not JSON`);
    }
    if (reply.error) {
      throw new Error(`the chain node refused ${method}: ${reply.error.message || JSON.stringify(reply.error)}`);
    }
    return reply.result;
  }

  // ---------------------------------------------------------------------------------------------
  // Checks

  // Runs `body(step)`; `step(label, detail, ok)` records a step and returns ok. The first failed step, or
  // an exception (recorded as a failed step under the label being worked on), ends the check.
  async function runSteps(body) {
    const steps = [];
    let current = "Arguments";
    const step = (label, detail, ok) => {
      steps.push({ label, detail, ok: Boolean(ok) });
      if (!ok) throw new StepFailed();
      return true;
    };
    const working = (label) => {
      current = label;
    };
    try {
      await body(step, working);
    } catch (error) {
      if (!(error instanceof StepFailed)) {
        steps.push({ label: current, detail: error && error.message ? error.message : String(error), ok: false });
      }
    }
    return { ok: steps.length > 0 && steps.every((s) => s.ok), steps };
  }

  class StepFailed extends Error {}

  function requireArgs(args, names) {
    if (args === null || typeof args !== "object") throw new Error("the check's arguments are not an object");
    const missing = names.filter((n) => args[n] === undefined || args[n] === null || args[n] === "");
    if (missing.length) throw new Error(`missing argument${missing.length > 1 ? "s" : ""}: ${missing.join(", ")}`);
  }

  function uint(value, bits, what) {
    let n;
    try {
      if (typeof value === "number" && !Number.isSafeInteger(value)) throw new Error();
      if (typeof value === "string" && !/^[0-9]+$/.test(value.trim())) throw new Error();
      n = BigInt(typeof value === "string" ? value.trim() : value);
    } catch (error) {
      throw new Error(`${what} must be a non-negative integer (decimal), got ${JSON.stringify(value)}`);
    }
    if (n < 0n || n >= 1n << BigInt(bits)) throw new Error(`${what} does not fit in uint${bits}: ${value}`);
    return n;
  }

  function word(n) {
    return n.toString(16).padStart(64, "0");
  }

  function address(value, what) {
    return hex0x(hexToBytes(value, 20, what)).toLowerCase();
  }

  function addressTopic(addr) {
    return "0x" + "0".repeat(24) + addr.slice(2);
  }

  const selector = (signature) => bytesToHex(keccak256(utf8(signature)).slice(0, 4));
  const eventTopic = (signature) => hex0x(keccak256(utf8(signature)));

  async function inclusion(args) {
    return runSteps(async (step, working) => {
      requireArgs(args, ["contributionId", "proof", "datanetId", "version", "registry", "rpcUrl"]);
      const claimed = bytesToHex(hexToBytes(args.contributionId, 32, "contributionId"));
      if (!Array.isArray(args.proof)) throw new Error("proof must be a list of 32-byte hex values");
      const proof = args.proof.map((p, i) => hexToBytes(p, 32, `proof element #${i}`));
      const version = uint(args.version, 64, "version");
      const registry = address(args.registry, "registry");
      if (typeof args.text !== "string") throw new Error("no contribution text to hash");

      working("Contribution id");
      const normalized = normalize(args.text);
      const encoded = utf8(normalized);
      const id = bytesToHex(await sha256(encoded));
      step(
        "Contribution id",
        `sha256(normalized text, ${encoded.length} UTF-8 bytes) = ${id}\nclaimed contribution id = ${claimed}\n` +
          (id === claimed ? "equal" : "DIFFERENT: this text is not the contribution the id names"),
        id === claimed,
      );

      working("Merkle leaf");
      const inner = keccak256(hexToBytes(id, 32));
      const leaf = keccak256(inner);
      step(
        "Merkle leaf",
        `keccak256(0x${id}) = ${hex0x(inner)}\nleaf = keccak256(${hex0x(inner)}) = ${hex0x(leaf)}`,
        true,
      );

      working("Root computed from the proof");
      let node = leaf;
      const lines = [];
      proof.forEach((sibling, i) => {
        const [low, high] = compareBytes(node, sibling) <= 0 ? [node, sibling] : [sibling, node];
        const parent = keccak256(concatBytes(low, high));
        lines.push(`level ${i + 1}: keccak256(${hex0x(low)} ++ ${bytesToHex(high)}) = ${hex0x(parent)}`);
        node = parent;
      });
      const computed = hex0x(node);
      lines.push(proof.length ? `computed root = ${computed}` : `empty proof: the root is the leaf, ${computed}`);
      step("Root computed from the proof", lines.join("\n"), true);

      working("Root anchored on-chain");
      const key = keccak256(utf8(String(args.datanetId)));
      const data = "0x" + selector("rootOf(bytes32,uint64)") + bytesToHex(key) + word(version);
      const chainId = await rpc(args.rpcUrl, "eth_chainId", []);
      const head = await rpc(args.rpcUrl, "eth_blockNumber", []);
      const answer = await rpc(args.rpcUrl, "eth_call", [{ to: registry, data }, "latest"]);
      const call =
        `datanet key = keccak256(utf8(${JSON.stringify(String(args.datanetId))})) = ${hex0x(key)}\n` +
        `eth_call to ${registry} on chain ${BigInt(chainId)} at block ${BigInt(head)}, data ${data}\n` +
        `(cast call ${registry} "rootOf(bytes32,uint64)(bytes32)" ${hex0x(key)} ${version} --rpc-url ${args.rpcUrl})\n`;
      if (typeof answer !== "string" || answer === "0x") {
        const why = `the call returned ${JSON.stringify(answer)}: no registry contract at ${registry}`;
        step("Root anchored on-chain", call + why, false);
      }
      const anchored = hex0x(hexToBytes(answer, 32, "rootOf's answer"));
      const isZero = /^0x0+$/.test(anchored);
      step(
        "Root anchored on-chain",
        call + (isZero
          ? `rootOf = ${anchored}: version ${version} of datanet ${JSON.stringify(String(args.datanetId))} ` +
            "is not anchored"
          : `rootOf = ${anchored}`),
        !isZero,
      );

      working("Computed root equals the anchored root");
      step(
        "Computed root equals the anchored root",
        `computed ${computed}\nanchored ${anchored}\n` +
          (computed === anchored ? "equal: the contribution is in this anchored version"
            : "DIFFERENT: the proof does not lead to the anchored root"),
        computed === anchored,
      );
    });
  }

  const BATCH_SETTLED = "BatchSettled(bytes32,bytes32,uint256,uint256)";
  const TRANSFER = "Transfer(address,address,uint256)";

  async function payout(args) {
    return runSteps(async (step, working) => {
      requireArgs(args, ["rpcUrl", "txHash", "batchId", "settler", "token", "payee", "amount"]);
      const txHash = hex0x(hexToBytes(args.txHash, 32, "txHash")).toLowerCase();
      const batchId = hex0x(hexToBytes(args.batchId, 32, "batchId")).toLowerCase();
      const settler = address(args.settler, "settler");
      const token = address(args.token, "token");
      const payee = address(args.payee, "payee");
      const amount = uint(args.amount, 256, "amount");

      working("Transaction receipt");
      const receipt = await rpc(args.rpcUrl, "eth_getTransactionReceipt", [txHash]);
      if (!receipt) {
        const why = "the node does not know the transaction, or it is not mined";
        step("Transaction receipt", `no receipt for ${txHash}: ${why}`, false);
      }
      const blockNumber = BigInt(receipt.blockNumber);
      step(
        "Transaction receipt",
        `transaction ${txHash} mined in block ${blockNumber} (${receipt.blockHash}), status ${receipt.status}` +
          (receipt.status === "0x1" ? " (success)" : " (REVERTED: it paid nobody)") +
          `\n(cast receipt ${txHash} --rpc-url ${args.rpcUrl})`,
        receipt.status === "0x1",
      );

      working("Sent to the settler");
      const to = (receipt.to || "").toLowerCase();
      const sentTo = `transaction to ${to || "(none: a contract creation)"}; settler ${settler}`;
      step("Sent to the settler", sentTo, to === settler);

      working("BatchSettled event");
      const logs = Array.isArray(receipt.logs) ? receipt.logs : [];
      const settledTopic = eventTopic(BATCH_SETTLED);
      const settled = logs.filter(
        (log) => (log.address || "").toLowerCase() === settler && (log.topics || [])[0] === settledTopic,
      );
      const ours = settled.find((log) => (log.topics[1] || "").toLowerCase() === batchId);
      let detail = `${BATCH_SETTLED} topic ${settledTopic}\n`;
      if (ours) {
        const data = hexToBytes(ours.data, 96, "BatchSettled data");
        detail +=
          `log #${BigInt(ours.logIndex)} from ${settler}: batchId ${batchId}, ` +
          `manifestHash ${hex0x(data.slice(0, 32))}, ` +
          `count ${BigInt(hex0x(data.slice(32, 64)))}, total ${BigInt(hex0x(data.slice(64, 96)))}`;
      } else {
        detail += settled.length
          ? `the settler's BatchSettled logs name other batches: ${settled.map((l) => l.topics[1]).join(", ")}; ` +
            `expected ${batchId}`
          : `no BatchSettled log from ${settler} in this transaction`;
      }
      step("BatchSettled event", detail, Boolean(ours));

      working("Token transfer to the payee");
      const transferTopic = eventTopic(TRANSFER);
      const transfers = logs
        .filter((log) => (log.address || "").toLowerCase() === token && (log.topics || [])[0] === transferTopic)
        .filter((log) => (log.topics[1] || "").toLowerCase() === addressTopic(settler))
        .map((log) => ({
          to: "0x" + log.topics[2].slice(26).toLowerCase(),
          value: BigInt(hex0x(hexToBytes(log.data, 32, "Transfer value"))),
          index: BigInt(log.logIndex),
        }));
      const toPayee = transfers.filter((t) => t.to === payee);
      const paid = toPayee.reduce((sum, t) => sum + t.value, 0n);
      detail = `${TRANSFER} topic ${transferTopic}, token ${token}, from the settler ${settler}\n`;
      if (toPayee.length) {
        detail += toPayee.map((t) => `log #${t.index}: ${t.value} base units to ${t.to}`).join("\n");
        detail += `\npaid to ${payee}: ${paid}; expected ${amount}` + (paid === amount ? " (equal)" : " (DIFFERENT)");
      } else {
        detail += `no transfer to ${payee} in this transaction ` +
          `(${transfers.length} transfer(s) from the settler to others)`;
      }
      step("Token transfer to the payee", detail, toPayee.length > 0 && paid === amount);

      working("Block on the chain");
      const block = await rpc(args.rpcUrl, "eth_getBlockByNumber", ["0x" + blockNumber.toString(16), false]);
      const head = BigInt(await rpc(args.rpcUrl, "eth_blockNumber", []));
      const onChain = Boolean(block) && (block.hash || "").toLowerCase() === (receipt.blockHash || "").toLowerCase();
      const confirmations = head >= blockNumber ? head - blockNumber + 1n : 0n;
      step(
        "Block on the chain",
        `block ${blockNumber} of the chain: ${block ? block.hash : "(none)"}; receipt's block ${receipt.blockHash}\n` +
          (onChain
            ? `same block; head is block ${head}: ${confirmations} confirmation${confirmations === 1n ? "" : "s"}`
            : "DIFFERENT: the transaction's block is no longer on the chain (reorganized)"),
        onChain,
      );
    });
  }

  // ---------------------------------------------------------------------------------------------
  // DOM

  const CHECKS = { inclusion, payout };

  function render(element, result) {
    const list = element.querySelector(".verify-steps");
    if (list) {
      list.replaceChildren(
        ...result.steps.map((s) => {
          const item = document.createElement("li");
          item.dataset.ok = String(s.ok);
          const label = document.createElement("span");
          label.className = "verify-label";
          label.textContent = s.label;
          const detail = document.createElement("pre");
          detail.className = "verify-detail";
          detail.textContent = s.detail;
          item.append(label, detail);
          return item;
        }),
      );
    }
  }

  function setState(element, state) {
    element.dataset.state = state;
    const verdict = element.querySelector(".verify-verdict");
    if (verdict) {
      verdict.dataset.state = state;
      verdict.textContent = state === "running" ? "" : state;
    }
  }

  const failure = (label, detail) => ({ ok: false, steps: [{ label, detail, ok: false }] });

  async function run(element) {
    const button = element.querySelector(".verify-run");
    if (button) button.disabled = true;
    setState(element, "running");
    const list = element.querySelector(".verify-steps");
    if (list) list.replaceChildren();
    let result;
    try {
      const kind = element.dataset.verify;
      const check = Object.prototype.hasOwnProperty.call(CHECKS, kind) ? CHECKS[kind] : null;
      let args;
      try {
        args = JSON.parse(element.dataset.args || "");
      } catch (error) {
        args = error;
      }
      if (!check) {
        result = failure("Arguments", `unknown check data-verify="${kind}"`);
      } else if (args instanceof Error) {
        result = failure("Arguments", `data-args is not valid JSON: ${args.message}`);
      } else {
        const text = element.querySelector("textarea.verify-text");
        if (text && kind === "inclusion" && args && typeof args === "object") args = { ...args, text: text.value };
        result = await check(args);
      }
    } catch (error) {
      result = failure("Check", String(error && error.message ? error.message : error));
    }
    render(element, result);
    setState(element, result.ok ? "verified" : "failed");
    if (button) button.disabled = false;
    element.dispatchEvent(new CustomEvent("verify:done", { detail: result }));
    return result;
  }

  function bind(root) {
    const scope = root || document;
    scope.querySelectorAll("[data-verify]").forEach((element) => {
      if (element.dataset.verifyBound) return;
      element.dataset.verifyBound = "true";
      const button = element.querySelector(".verify-run");
      if (button) button.addEventListener("click", () => run(element));
      else run(element);
    });
  }

  window.PortalVerify = {
    keccak256,
    sha256,
    normalize,
    contributionId,
    inclusion,
    payout,
    run,
    bind,
    bytesToHex,
    hexToBytes,
    utf8,
    _sha256Fallback: sha256Fallback,
  };

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", () => bind(document));
  else bind(document);
})();
