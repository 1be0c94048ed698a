// Compiles every ledger/chain/contracts/*.sol with solcjs and writes one artifact per deployable contract:
//   <out_dir>/<ContractName>.json = {abi, bytecode, compiler, contractName, sourceSha256}
// Usage: node ledger/chain/contracts/compile.mjs [out_dir]   (default: ledger/chain/contracts/artifacts)
//
// The output is byte-identical between runs and machines (same solc and OpenZeppelin versions):
// sources are keyed by file name (never by absolute path), keys are sorted, indent 2, trailing newline.
// Interfaces and abstract contracts have no bytecode and get no artifact. Artifacts in out_dir
// whose contract no longer exists are removed.
import { createHash } from "node:crypto";
import fs from "node:fs";
import { createRequire } from "node:module";
import path from "node:path";
import { fileURLToPath } from "node:url";

const CONTRACTS_DIR = path.dirname(fileURLToPath(import.meta.url));
const DEFAULT_OUT_DIR = path.join(CONTRACTS_DIR, "artifacts");
const EVM_VERSION = "cancun";
const OPTIMIZER_RUNS = 200;

function fail(message) {
  process.stderr.write(`compile.mjs: ${message}\n`);
  process.exit(1);
}

function loadSolc() {
  const require = createRequire(import.meta.url);
  try {
    return require("solc");
  } catch (error) {
    fail(`cannot load the npm package 'solc' (${error.code ?? error.message}); run \`make install\``);
  }
}

// Resolves a non-relative import such as "@openzeppelin/contracts/access/Ownable.sol" the way
// Node resolves packages: node_modules/<path> in this directory or the nearest parent having it.
function findImport(importPath) {
  for (let dir = CONTRACTS_DIR; ; dir = path.dirname(dir)) {
    const candidate = path.join(dir, "node_modules", importPath);
    if (fs.existsSync(candidate)) return { contents: fs.readFileSync(candidate, "utf8") };
    if (path.dirname(dir) === dir) break;
  }
  return { error: `${importPath} not found in node_modules; run \`make install\`` };
}

function sortKeys(value) {
  if (Array.isArray(value)) return value.map(sortKeys);
  if (value !== null && typeof value === "object") {
    return Object.fromEntries(
      Object.keys(value)
        .sort()
        .map((key) => [key, sortKeys(value[key])]),
    );
  }
  return value;
}

function isArtifact(file) {
  try {
    const parsed = JSON.parse(fs.readFileSync(file, "utf8"));
    return typeof parsed.contractName === "string" && typeof parsed.sourceSha256 === "string";
  } catch {
    return false;
  }
}

function main() {
  const outDir = path.resolve(process.argv[2] ?? DEFAULT_OUT_DIR);
  const solc = loadSolc();
  const files = fs
    .readdirSync(CONTRACTS_DIR)
    .filter((name) => name.endsWith(".sol"))
    .sort();
  if (files.length === 0) fail(`no .sol files in ${CONTRACTS_DIR}`);

  const sources = {};
  const sourceSha256 = {};
  for (const name of files) {
    const text = fs.readFileSync(path.join(CONTRACTS_DIR, name), "utf8");
    sources[name] = { content: text };
    sourceSha256[name] = createHash("sha256").update(text, "utf8").digest("hex");
  }
  const input = {
    language: "Solidity",
    sources,
    settings: {
      evmVersion: EVM_VERSION,
      optimizer: { enabled: true, runs: OPTIMIZER_RUNS },
      outputSelection: { "*": { "*": ["abi", "evm.bytecode.object"] } },
    },
  };
  const output = JSON.parse(solc.compile(JSON.stringify(input), { import: findImport }));

  const diagnostics = output.errors ?? [];
  for (const diagnostic of diagnostics.filter((d) => d.severity !== "error")) {
    process.stderr.write(diagnostic.formattedMessage ?? `${diagnostic.message}\n`);
  }
  const errors = diagnostics.filter((d) => d.severity === "error");
  if (errors.length > 0) {
    for (const error of errors) process.stderr.write(error.formattedMessage ?? `${error.message}\n`);
    fail(`${errors.length} compile error(s); no artifacts written`);
  }

  fs.mkdirSync(outDir, { recursive: true });
  const written = new Set();
  for (const name of files) {
    for (const [contractName, compiled] of Object.entries(output.contracts?.[name] ?? {})) {
      const bytecode = compiled.evm?.bytecode?.object ?? "";
      if (bytecode === "") continue; // interface or abstract contract
      if (written.has(contractName)) fail(`two contracts are named ${contractName}`);
      const artifact = sortKeys({
        contractName,
        abi: compiled.abi,
        bytecode: `0x${bytecode}`,
        compiler: solc.version(),
        sourceSha256: sourceSha256[name],
      });
      const target = path.join(outDir, `${contractName}.json`);
      const text = `${JSON.stringify(artifact, null, 2)}\n`;
      if (!fs.existsSync(target) || fs.readFileSync(target, "utf8") !== text) fs.writeFileSync(target, text);
      written.add(contractName);
      process.stdout.write(`${path.relative(process.cwd(), target)}\n`);
    }
  }
  for (const name of fs.readdirSync(outDir)) {
    const file = path.join(outDir, name);
    if (name.endsWith(".json") && !written.has(name.slice(0, -5)) && isArtifact(file)) {
      fs.unlinkSync(file);
      process.stdout.write(`removed stale ${path.relative(process.cwd(), file)}\n`);
    }
  }
}

main();
