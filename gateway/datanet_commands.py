"""`gateway datanet create|contribute|publish|proof|list|show`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from gateway.cli_output import CommandError, emit, json_flag, progress
from gateway.config import GatewayConfig
from gateway.contributor_key import KEY_ENV, load_private_key
from gateway.ledger_access import index_builder, open_registries, registry_contract
from registry.contribution_content import address_of_key, content_id, normalize, sign_contribution
from registry.contribution_files import read_contribution_files
from registry.datanets import SignedText

def cmd_create(config: GatewayConfig, args: argparse.Namespace) -> None:
    datanet = open_registries(config).datanets.create(args.name, args.description or "")
    emit(args, {"name": datanet.name, "id": datanet.id}, lambda p: f"created datanet '{p['name']}' (id {p['id']})")


def cmd_contribute(config: GatewayConfig, args: argparse.Namespace) -> None:
    key = load_private_key(args.key_file)
    contributor = address_of_key(key)
    registries = open_registries(config)
    datanet = registries.datanets.get(args.name)
    texts, rejected = read_contribution_files([Path(f) for f in args.files])
    items = [
        SignedText(t.source, t.text, contributor, sign_contribution(key, datanet.id, content_id(normalize(t.text))),
                   args.license)
        for t in texts
    ]
    result = registries.datanets.contribute(args.name, items)
    payload = {
        "contributions": [{"id": a.id, "contributor": a.contributor, "file": a.source} for a in result.accepted],
        "rejected": [{"file": r.source, "reason": r.reason} for r in [*rejected, *result.rejected]],
    }

    def human(p: dict[str, Any]) -> str:
        lines = [f"accepted {len(p['contributions'])} contribution(s) from {contributor} into '{args.name}'"]
        lines += [f"  + {c['id']}  {c['file']}" for c in p["contributions"]]
        lines += [f"  - rejected {r['file']}: {r['reason']}" for r in p["rejected"]]
        return "\n".join(lines)

    emit(args, payload, human)


def cmd_publish(config: GatewayConfig, args: argparse.Namespace) -> None:
    registries = open_registries(config)
    registries.datanets.get(args.name)
    progress(f"[publish] '{args.name}': freezing contributions, building the attribution index")
    with registry_contract(config) as registry:
        version = registries.datanets.publish(args.name, index_builder(config, progress), registry,
                                              config.layout.indexes, config.index_store)
    payload = {
        "name": version.datanet, "version": version.version, "merkle_root": version.merkle_root,
        "tx_hash": version.tx_hash, "contributions": version.contributions, "index_path": version.index_path,
        "index_digest": version.index_digest,
    }
    emit(args, payload, lambda p: (
        f"published '{p['name']}' version {p['version']}: {p['contributions']} contributions, "
        f"root {p['merkle_root']} anchored in {p['tx_hash']}"))


def cmd_proof(config: GatewayConfig, args: argparse.Namespace) -> None:
    if (args.contribution_id is None) == (args.file is None):
        raise CommandError("give either a CONTRIBUTION_ID or --file PATH")
    cid = args.contribution_id
    if args.file is not None:
        texts, rejected = read_contribution_files([args.file])
        if rejected or len(texts) != 1:
            raise CommandError(rejected[0].reason if rejected else f"{args.file} holds {len(texts)} texts, not one")
        cid = content_id(normalize(texts[0].text))
    registries = open_registries(config)
    registries.datanets.get(args.name)
    with registry_contract(config) as registry:
        proof = registries.datanets.proof(args.name, cid, registry, version=args.version)
        registry_address = registry.address
    payload = {
        "root": proof.root, "proof": proof.proof, "verified_on_chain": proof.verified_on_chain,
        "datanet": proof.datanet, "version": proof.version, "contribution_id": proof.contribution_id,
        "root_on_chain": proof.root_on_chain, "anchor_tx": proof.anchor_tx, "registry": registry_address,
    }
    emit(args, payload, lambda p: (
        f"contribution {p['contribution_id']} is in '{p['datanet']}' version {p['version']}\n"
        f"root {p['root']} (on-chain: {p['root_on_chain']}, registry {p['registry']})\n"
        f"proof: {' '.join(p['proof']) or '(single leaf)'}\n"
        f"verified on-chain: {'yes' if p['verified_on_chain'] else 'NO'}"))


def cmd_list(config: GatewayConfig, args: argparse.Namespace) -> None:
    datanets = open_registries(config).datanets.list()
    emit(args, {"datanets": datanets}, lambda p: "\n".join(
        f"{d['name']:24} v{d['latest_version'] or '-':<4} {d['contributions']:>7} contributions  {d['description']}"
        for d in p["datanets"]) or "no datanets yet")


def cmd_show(config: GatewayConfig, args: argparse.Namespace) -> None:
    registry = open_registries(config).datanets
    datanet = registry.get(args.name)
    versions = [
        {"version": v.number, "merkle_root": v.merkle_root, "contributions": v.contribution_count,
         "tx_hash": v.anchor_tx, "published_at": v.published_at.isoformat(), "index_path": v.index_path,
         "index_digest": v.index_digest}
        for v in registry.versions(args.name)
    ]
    contributions = [
        {"id": c.id, "contributor": c.contributor, "status": c.status, "version": c.version, "bytes": c.bytes,
         "license": c.license}
        for c in registry.contributions(args.name)
    ]
    rejections = [
        {"content_id": r.content_id, "contributor": r.contributor, "file": r.source, "reason": r.reason,
         "created_at": r.created_at.isoformat()}
        for r in registry.rejections(args.name)
    ]
    payload = {"name": datanet.name, "id": datanet.id, "description": datanet.description,
               "versions": versions, "contributions": contributions, "rejections": rejections}

    def human(p: dict[str, Any]) -> str:
        lines = [f"{p['name']} (id {p['id']}) {p['description']}".rstrip()]
        lines += [f"  version {v['version']}: {v['contributions']} contributions, root {v['merkle_root']}, "
                  f"tx {v['tx_hash'] or 'not anchored yet'}" for v in p["versions"]]
        lines += [f"  {c['id'][:16]}…  {c['contributor']}  {c['status']}" for c in p["contributions"]]
        if p["rejections"]:
            newest = p["rejections"][0]
            lines.append(f"  {len(p['rejections'])} recorded rejection(s); newest: {newest['file']} from "
                         f"{newest['contributor']}: {newest['reason']}")
        return "\n".join(lines)

    emit(args, payload, human)


def add_parser(commands: argparse._SubParsersAction) -> None:
    datanet = commands.add_parser("datanet", help="community datasets: contributions, versions, proofs")
    sub = datanet.add_subparsers(dest="datanet_command", required=True)

    create = sub.add_parser("create", help="create a datanet")
    create.add_argument("name")
    create.add_argument("--description", default="")
    json_flag(create)
    create.set_defaults(func=cmd_create)

    contribute = sub.add_parser("contribute", help="sign and add .txt/.md/.jsonl contributions")
    contribute.add_argument("name")
    contribute.add_argument("files", nargs="+", metavar="FILE")
    contribute.add_argument("--key-file", type=Path, help=f"file holding the contributor's private key (else ${KEY_ENV})")
    contribute.add_argument("--license", default=None, help="license of the contributed text (default CC-BY-4.0)")
    json_flag(contribute)
    contribute.set_defaults(func=cmd_contribute)

    publish = sub.add_parser("publish", help="freeze a new version: index it and anchor its Merkle root on-chain")
    publish.add_argument("name")
    json_flag(publish)
    publish.set_defaults(func=cmd_publish)

    proof = sub.add_parser("proof", help="inclusion proof of a contribution, checked against the on-chain root")
    proof.add_argument("name")
    proof.add_argument("contribution_id", nargs="?", metavar="CONTRIBUTION_ID")
    proof.add_argument("--file", type=Path, help="prove the contribution with this file's content instead")
    proof.add_argument("--version", type=int, help="a published version (default: the latest)")
    json_flag(proof)
    proof.set_defaults(func=cmd_proof)

    listing = sub.add_parser("list", help="list datanets")
    json_flag(listing)
    listing.set_defaults(func=cmd_list)

    show = sub.add_parser("show", help="a datanet's versions and contributions")
    show.add_argument("name")
    json_flag(show)
    show.set_defaults(func=cmd_show)
