"""Runs the real dmzproxy binary: exit codes, text and JSON output of check and explain.

Environment: DMZPROXY (the binary) and DMZ_SOURCE_DIR (the repository root).
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "support"))
import byo_pki  # noqa: E402  (tests/support)

DMZPROXY = os.environ.get("DMZPROXY", "")
SOURCE_DIR = os.environ.get("DMZ_SOURCE_DIR", "")
TOPOLOGY = os.path.join(SOURCE_DIR, "topology", "exchange-two-tier.toml")
SCENARIOS = os.path.join(SOURCE_DIR, "topology", "scenarios")
CLIENT = "127.10.0.100"

SCENARIO_CODES = {
    "port-25-conflict": "TOP001",
    "listener-conflict": "LST001",
    "open-relay": "SMTP001",
    "shadowed-rule": "RULE001",
    "test-rule-enabled": "RULE003",
    "publishing-loop": "TOP002",
}


def run(*args, timeout=60):
    return subprocess.run([DMZPROXY, *args], capture_output=True, text=True, timeout=timeout, check=False)


def explain(*args):
    return run("explain", "-t", TOPOLOGY, "--from", CLIENT, *args)


def explain_json(*args):
    res = explain("--json", *args)
    return res, json.loads(res.stdout)


class Environment(unittest.TestCase):
    def test_binary_and_sources_given(self):
        self.assertTrue(os.access(DMZPROXY, os.X_OK), f"DMZPROXY={DMZPROXY!r} is not executable")
        self.assertTrue(os.path.isfile(TOPOLOGY), TOPOLOGY)


class TempFiles(unittest.TestCase):
    def setUp(self):
        self._dir = tempfile.TemporaryDirectory(prefix="dmz-cli-test-")
        self.dir = self._dir.name

    def tearDown(self):
        self._dir.cleanup()

    def write(self, name, text):
        path = os.path.join(self.dir, name)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path


class CheckExitCodes(TempFiles):
    def test_default_topology_is_clean(self):
        res = run("check", "-t", TOPOLOGY)
        self.assertEqual(res.returncode, 0, res.stdout + res.stderr)
        self.assertIn("0 errors, 0 warnings", res.stdout)
        # Without -q the expanded rules are shown, with their file:line.
        self.assertIn("Exchange/owa", res.stdout)
        self.assertIn("default deny", res.stdout)
        self.assertRegex(res.stdout, r"front-end\.toml:\d+:\d+")

    def test_quiet_prints_only_findings(self):
        res = run("check", "-q", "-t", TOPOLOGY)
        self.assertEqual(res.returncode, 0)
        self.assertNotIn("Exchange/owa", res.stdout)
        self.assertIn("0 errors", res.stdout)

    def test_each_scenario_fails_with_its_code(self):
        files = sorted(f for f in os.listdir(SCENARIOS) if f.endswith(".toml"))
        self.assertGreaterEqual(len(files), 6)
        for name in files:
            stem = name[: -len(".toml")]
            with self.subTest(scenario=stem):
                self.assertIn(stem, SCENARIO_CODES, f"no expected code for scenario {stem}")
                path = os.path.join(SCENARIOS, name)
                res = run("check", "-q", "-t", path)
                self.assertEqual(res.returncode, 1, res.stdout + res.stderr)
                code = SCENARIO_CODES[stem]
                # "file:line:column: error CODE: message"
                self.assertRegex(res.stdout, rf"{name}:\d+:\d+: error {code}: ")

    def test_toml_syntax_error_exits_2_with_file_line_column(self):
        path = self.write("broken.toml", '[listeners.web]\nprotocol = "http"\nbind = ["127.0.0.1:8080"\n\n[[rules]]\n')
        res = run("check", "-c", path)
        self.assertEqual(res.returncode, 2, res.stdout + res.stderr)
        out = res.stdout + res.stderr
        self.assertRegex(out, rf"{path}:\d+:\d+: error CFG001: TOML syntax")
        self.assertIn("could not be parsed", out)

    def test_syntax_error_in_an_instance_config_of_a_topology_exits_2(self):
        cfg = self.write("front.toml", "[listeners.web\n")
        topo = self.write(
            "topo.toml",
            '[topology]\nname = "t"\n\n[networks.External]\nranges = ["127.10.0.0/16"]\n\n'
            '[instances.front]\nrole = "single"\nlegs = [{ network = "External", address = "127.10.0.10" }]\n'
            'config = "front.toml"\n',
        )
        res = run("check", "-t", topo)
        self.assertEqual(res.returncode, 2, res.stdout + res.stderr)
        self.assertRegex(res.stdout, rf"{cfg}:1:\d+: error CFG001")

    def test_missing_file_exits_2(self):
        res = run("check", "-c", os.path.join(self.dir, "nope.toml"))
        self.assertEqual(res.returncode, 2, res.stdout + res.stderr)
        self.assertIn("CFG007", res.stdout)

    def test_config_with_an_error_exits_1_and_names_line_and_column(self):
        path = self.write("cfg.toml", '[listeners.web]\nprotocol = "http"\nbind = ["127.0.0.1:8080"]\nprotocl = "x"\n')
        res = run("check", "-c", path)
        self.assertEqual(res.returncode, 1, res.stdout + res.stderr)
        self.assertIn(f"{path}:4:1: error CFG002: unknown key 'protocl'", res.stdout)
        self.assertIn("did you mean 'protocol'?", res.stdout)

    def test_clean_config_exits_0(self):
        path = self.write(
            "cfg.toml",
            '[listeners.web]\nprotocol = "http"\nbind = ["127.0.0.1:8080"]\n\n'
            '[[rules]]\nname = "OWA"\naction = "allow"\npaths = ["/owa"]\n'
            'target = { address = "127.0.0.2", port = 80 }\n',
        )
        res = run("check", "-c", path)
        self.assertEqual(res.returncode, 0, res.stdout + res.stderr)

    def test_usage_errors_exit_2(self):
        for args in (["check"], ["check", "--json"], ["frobnicate"], [], ["check", "-c", "a", "-t", "b"],
                     ["explain", "-t", TOPOLOGY, "https://mail.contoso.com/owa/"]):
            with self.subTest(args=args):
                res = run(*args)
                self.assertEqual(res.returncode, 2, res.stdout + res.stderr)


class CheckJson(TempFiles):
    def test_scenario_findings(self):
        res = run("check", "--json", "-t", os.path.join(SCENARIOS, "open-relay.toml"))
        self.assertEqual(res.returncode, 1)
        doc = json.loads(res.stdout)
        self.assertFalse(doc["ok"])
        self.assertTrue(doc["parsed"])
        self.assertEqual(doc["errors"], 1)
        self.assertEqual(doc["warnings"], 1)
        self.assertTrue(doc["findings"])
        for f in doc["findings"]:
            for key in ("severity", "code", "message", "file", "line", "column"):
                self.assertIn(key, f)
            self.assertIsInstance(f["line"], int)
            self.assertIsInstance(f["column"], int)
            self.assertGreater(f["line"], 0)
            self.assertTrue(f["file"].endswith("open-relay.toml"), f["file"])
        codes = {(f["severity"], f["code"]) for f in doc["findings"]}
        self.assertIn(("error", "SMTP001"), codes)
        self.assertIn(("warning", "SMTP002"), codes)

    def test_instances_list_expanded_rules(self):
        res = run("check", "--json", "-t", TOPOLOGY)
        self.assertEqual(res.returncode, 0)
        doc = json.loads(res.stdout)
        self.assertTrue(doc["ok"])
        self.assertEqual(doc["findings"], [])
        instances = {i["name"]: i for i in doc["instances"]}
        self.assertEqual(set(instances), {"front-end", "back-end"})
        fe = instances["front-end"]
        self.assertEqual(fe["role"], "front-end")
        names = [r["name"] for r in fe["rules"]]
        self.assertEqual(
            names,
            ["Exchange/owa", "Exchange/activesync", "Exchange/outlook_anywhere", "Exchange/mapi", "Exchange/ews",
             "Exchange/autodiscover", "Exchange/oab", "Exchange/smtp", "Test rule"],
        )
        owa = fe["rules"][0]
        self.assertEqual(owa["template"], "Exchange")
        self.assertEqual(owa["service"], "owa")
        self.assertEqual(owa["paths"], ["/owa"])
        self.assertEqual(owa["max_body"], 35000000)
        self.assertEqual(owa["target"]["instance"], "back-end")
        self.assertEqual(owa["target"]["address"], "127.20.0.20")
        self.assertTrue(owa["file"].endswith("front-end.toml"))
        self.assertGreater(owa["line"], 0)
        eas = next(r for r in fe["rules"] if r["name"] == "Exchange/activesync")
        self.assertGreaterEqual(eas["target"]["timeouts"]["read_ms"], 3540 * 1000)
        smtp = next(r for r in fe["rules"] if r["name"] == "Exchange/smtp")
        self.assertEqual(smtp["kind"], "server")
        self.assertEqual(smtp["accepted_domains"], ["contoso.com"])
        test = fe["rules"][-1]
        self.assertTrue(test["test"])
        self.assertFalse(test["enabled"])
        self.assertEqual({l["name"] for l in fe["listeners"]}, {"web", "http", "smtp"})

    def test_syntax_error_json(self):
        path = self.write("broken.toml", 'a = = 1\n')
        res = run("check", "--json", "-c", path)
        self.assertEqual(res.returncode, 2)
        doc = json.loads(res.stdout)
        self.assertFalse(doc["parsed"])
        self.assertEqual([f["code"] for f in doc["findings"]], ["CFG001"])
        self.assertEqual(doc["findings"][0]["line"], 1)
        self.assertEqual(doc["findings"][0]["file"], path)


class ExplainExitCodes(unittest.TestCase):
    def test_allowed_exits_0(self):
        for args in (["https://mail.contoso.com/owa/"],
                     ["-X", "RPC_IN_DATA", "https://mail.contoso.com/rpc/rpcproxy.dll?ex01:6001"],
                     ["smtp", "--mail-from", "a@example.org", "--rcpt", "user@contoso.com"],
                     ["--user", "alice", "smtp", "--mail-from", "a@example.org", "--rcpt", "user@fabrikam.com"]):
            with self.subTest(args=args):
                res = explain(*args)
                self.assertEqual(res.returncode, 0, res.stdout + res.stderr)

    def test_denied_exits_1(self):
        for args in (["https://mail.contoso.com/ecp/"],
                     ["https://mail.contoso.com/owa/../ecp/"],
                     ["https://nosuch.contoso.com/owa/"],
                     ["smtp", "--mail-from", "a@example.org", "--rcpt", "user@fabrikam.com"],
                     ["smtp", "--mail-from", "a@example.org", "--rcpt", "a%fabrikam.com@contoso.com"]):
            with self.subTest(args=args):
                res = explain(*args)
                self.assertEqual(res.returncode, 1, res.stdout + res.stderr)

    def test_bad_input_exits_2(self):
        for args in (["mail.contoso.com/owa/"], ["ftp://mail.contoso.com/"], ["https://mail.contoso.com:0/"],
                     ["smtp", "--mail-from", "a@example.org"]):
            with self.subTest(args=args):
                res = explain(*args)
                self.assertEqual(res.returncode, 2, res.stdout + res.stderr)
                self.assertIn("dmzproxy:", res.stderr)
        res = run("explain", "-t", TOPOLOGY, "--from", "not-an-ip", "https://mail.contoso.com/owa/")
        self.assertEqual(res.returncode, 2)

    def test_broken_topology_exits_2(self):
        res = run("explain", "-t", os.path.join(SOURCE_DIR, "no", "such.toml"), "--from", CLIENT,
                  "https://mail.contoso.com/owa/")
        self.assertEqual(res.returncode, 2)

    def test_with_test_rule_on_ecp_exits_0(self):
        res = explain("--with-test-rule", "https://mail.contoso.com/ecp/")
        self.assertEqual(res.returncode, 0, res.stdout + res.stderr)
        self.assertIn("test rules enabled", res.stdout)


class ExplainJson(unittest.TestCase):
    def test_allowed_request(self):
        res, doc = explain_json("-X", "POST", "https://mail.contoso.com/EWS/Exchange.asmx")
        self.assertEqual(res.returncode, 0)
        self.assertEqual(doc["verdict"], "allow")
        self.assertEqual(doc["outcome"], "ok")
        self.assertEqual(doc["reached"], "exchange")
        self.assertIsNone(doc["stopped_at"])
        self.assertEqual(doc["from"], CLIENT)
        self.assertEqual([t["instance"] for t in doc["tiers"]], ["front-end", "back-end"])
        for tier in doc["tiers"]:
            self.assertEqual(tier["listener"], "web")
            self.assertEqual(tier["matched_rule"], "Exchange/ews")
            self.assertEqual(tier["action"], "allow")
            self.assertEqual(tier["client"], CLIENT)
            self.assertTrue(tier["examined"])
            for e in tier["examined"]:
                for key in ("rule", "result", "reason", "condition", "file", "line"):
                    self.assertIn(key, e)
            last = tier["examined"][-1]
            self.assertEqual(last["rule"], "Exchange/ews")
            self.assertEqual(last["result"], "match")
            first = tier["examined"][0]
            self.assertEqual(first["rule"], "Exchange/owa")
            self.assertEqual(first["result"], "no-match")
            self.assertEqual(first["condition"], "paths")
            self.assertIn("/EWS/Exchange.asmx", first["reason"])
        self.assertEqual(doc["tiers"][1]["transport_source"], "127.20.0.10")
        self.assertIn("X-Forwarded-For", doc["tiers"][1]["client_note"])

    def test_denied_request(self):
        res, doc = explain_json("https://mail.contoso.com/ecp/")
        self.assertEqual(res.returncode, 1)
        self.assertEqual(doc["verdict"], "deny")
        self.assertEqual(doc["outcome"], "rule-fault")
        self.assertIsNone(doc["reached"])
        self.assertEqual(doc["stopped_at"], "front-end")
        self.assertEqual(len(doc["tiers"]), 1)
        tier = doc["tiers"][0]
        self.assertEqual(tier["matched_rule"], "default deny")
        self.assertEqual(tier["action"], "deny")
        self.assertEqual(tier["fault"], "no-rule-matched")
        self.assertIsNone(tier["target"])
        test = next(e for e in tier["examined"] if e["rule"] == "Test rule")
        self.assertEqual(test["result"], "skipped")
        self.assertEqual(doc["with_test_rules"]["outcome"], "ok")
        self.assertEqual(doc["with_test_rules"]["reached"], "exchange")

    def test_refused_path(self):
        res, doc = explain_json("https://mail.contoso.com/owa/%2e%2e/ecp/")
        self.assertEqual(res.returncode, 1)
        tier = doc["tiers"][0]
        self.assertEqual(tier["path"], "")
        self.assertIn("escapes", tier["path_refused"])

    def test_smtp(self):
        res, doc = explain_json("smtp", "--mail-from", "a@example.org", "--rcpt", "user@contoso.com")
        self.assertEqual(res.returncode, 0)
        self.assertEqual(doc["reached"], "exchange")
        self.assertEqual([t["smtp"] for t in doc["tiers"]], ["submit", "submit"])
        self.assertEqual([t["listener"] for t in doc["tiers"]], ["smtp", "smtp"])


class ExplainText(unittest.TestCase):
    def test_allowed_names_each_tier(self):
        res = explain("https://mail.contoso.com/owa/")
        self.assertEqual(res.returncode, 0)
        out = res.stdout
        self.assertIn("[1] front-end (front-end): listener web on 127.10.0.10:443", out)
        self.assertIn("[2] back-end (back-end): listener web on 127.20.0.20:443", out)
        self.assertIn("judges client 127.10.0.100 (X-Forwarded-For from trusted front-end)", out)
        self.assertIn("=> ALLOW by Exchange/owa", out)
        # The deciding rule with its file:line:column, as --json has it.
        self.assertRegex(out, r"=> ALLOW by Exchange/owa \(\S*exchange-two-tier/front-end\.toml:\d+:\d+\): ")
        self.assertRegex(out, r"=> ALLOW by Exchange/owa \(\S*exchange-two-tier/back-end\.toml:\d+:\d+\): ")
        self.assertIn("\nOK: reaches web on host 'exchange'", out)

    def test_ecp_is_a_rule_fault_with_the_test_rule_sentence(self):
        res = explain("https://mail.contoso.com/ecp/")
        self.assertEqual(res.returncode, 1)
        out = res.stdout
        self.assertIn("[1] front-end (front-end)", out)
        self.assertNotIn("[2]", out)
        self.assertIn("=> DENY by default deny", out)
        self.assertIn("RULE FAULT at front-end", out)
        self.assertIn("With each tier's test rule enabled it reaches 'exchange'", out)

    def test_unknown_name_is_a_network_fault(self):
        res = explain("https://nosuch.contoso.com/owa/")
        self.assertEqual(res.returncode, 1)
        self.assertIn("NETWORK FAULT at client", res.stdout)
        self.assertNotIn("[1]", res.stdout)

    def test_redirect_is_shown_first(self):
        res = explain("http://mail.contoso.com/owa/")
        self.assertEqual(res.returncode, 0)
        self.assertIn("first: listener 'http' of 'front-end' answers 301 to https://mail.contoso.com/owa/", res.stdout)

    def test_relay_denial_quotes_the_smtp_reply(self):
        res = explain("smtp", "--mail-from", "a@example.org", "--rcpt", "user@fabrikam.com")
        self.assertEqual(res.returncode, 1)
        self.assertIn("RULE FAULT at front-end: 550 5.7.1", res.stdout)
        self.assertIn("it still fails", res.stdout)


if __name__ == "__main__":
    unittest.main()


class Certs(TempFiles):
    """dmzproxy certs: a lab CA and leaves that openssl itself verifies, names included."""

    def openssl_verify(self, ca, leaf, name):
        return subprocess.run(["openssl", "verify", "-CAfile", ca, "-verify_hostname", name, leaf],
                              capture_output=True, text=True, timeout=30, check=False)

    def test_issue_verifies_with_openssl_for_each_name_and_not_others(self):
        state = os.path.join(self.dir, "state")
        res = run("certs", "--state", state, "issue", "mail.contoso.com", "autodiscover.contoso.com")
        self.assertEqual(res.returncode, 0, res.stderr)
        ca = os.path.join(state, "pki", "ca.pem")
        leaf = os.path.join(state, "pki", "mail.contoso.com.pem")
        key = os.path.join(state, "pki", "mail.contoso.com.key")
        for name in ("mail.contoso.com", "autodiscover.contoso.com"):
            v = self.openssl_verify(ca, leaf, name)
            self.assertEqual(v.returncode, 0, v.stdout + v.stderr)
        v = self.openssl_verify(ca, leaf, "owa.fabrikam.com")
        self.assertNotEqual(v.returncode, 0, "a name not on the certificate must not verify")
        self.assertEqual(os.stat(key).st_mode & 0o077, 0, "keys are private to their owner")

    def test_ca_is_made_once_and_reused(self):
        state = os.path.join(self.dir, "state")
        self.assertEqual(run("certs", "--state", state, "init").returncode, 0)
        ca = os.path.join(state, "pki", "ca.pem")
        with open(ca, "rb") as f:
            first = f.read()
        self.assertEqual(run("certs", "--state", state, "issue", "a.contoso.com").returncode, 0)
        self.assertEqual(run("certs", "--state", state, "init").returncode, 0)
        with open(ca, "rb") as f:
            self.assertEqual(f.read(), first)

    def test_show_lists_the_names(self):
        state = os.path.join(self.dir, "state")
        run("certs", "--state", state, "issue", "mail.contoso.com", "ex01.corp.contoso.com")
        res = run("certs", "--state", state, "show", os.path.join(state, "pki", "mail.contoso.com.pem"))
        self.assertEqual(res.returncode, 0, res.stderr)
        self.assertIn("name ex01.corp.contoso.com", res.stdout)
        bad = run("certs", "show", os.path.join(self.dir, "missing.pem"))
        self.assertEqual(bad.returncode, 1)


class BringYourOwnCertificate(TempFiles):
    """check loads every certificate and key a config names (issue 17, item 3): a PFX with
    its password file, PEM chains, encrypted PEM keys; each fault at its key's position."""

    @classmethod
    def setUpClass(cls):
        cls._pki_dir = tempfile.TemporaryDirectory(prefix="dmz-byo-pki-")
        cls.pki = byo_pki.ByoPki(cls._pki_dir.name)

    @classmethod
    def tearDownClass(cls):
        cls._pki_dir.cleanup()

    def config(self, names=("mail.contoso.com",), public_names=("mail.contoso.com",), **cert):
        """An instance config whose one certificate entry has `cert`'s keys, each on its
        own line (an array of tables), so that a finding's line says which key it is about."""
        lines = ['[instance]', 'name = "byo"', '', '[listeners.web]', 'protocol = "https"',
                 'bind = ["127.3.17.5:8443"]', '', '[[listeners.web.certificates]]',
                 'names = %s' % json.dumps(list(names))]
        lines += ['%s = %s' % (k, json.dumps(v)) for k, v in cert.items()]
        lines += ['', '[[rules]]', 'name = "OWA"', 'action = "allow"', 'public_names = %s' % json.dumps(list(public_names)),
                  'paths = ["/owa"]', 'target = { address = "127.3.17.6", port = 80 }', '']
        path = self.write("byo.toml", "\n".join(lines))
        return path, {l.split(" = ")[0]: i + 1 for i, l in enumerate(lines) if " = " in l}

    def check(self, path):
        return run("check", "-q", "-c", path)

    def findings(self, res, code):
        return [l for l in res.stdout.splitlines() if " %s: " % code in l]

    def assert_only(self, res, code, at, severity="error"):
        lines = self.findings(res, code)
        self.assertEqual(len(lines), 1, res.stdout)
        self.assertTrue(lines[0].startswith("%s:%d:1: %s %s:" % (at[0], at[1], severity, code)), lines[0])
        return lines[0]

    def assert_clean(self, res):
        self.assertEqual(res.returncode, 0, res.stdout + res.stderr)
        self.assertNotIn(" CERT0", res.stdout)

    def test_a_pfx_with_its_password_file_checks_clean(self):
        path, _ = self.config(cert=self.pki.pfx, password_file=self.pki.password_file)
        self.assert_clean(self.check(path))

    def test_a_pfx_without_password_loads_without_password_file(self):
        path, _ = self.config(cert=self.pki.pfx_open)
        self.assert_clean(self.check(path))

    def test_a_legacy_windows_pfx_loads(self):
        legacy = self.pki.legacy_pfx()
        if legacy is None:
            self.skipTest("this openssl cannot write RC2 (no legacy provider)")
        path, _ = self.config(cert=legacy, password_file=self.pki.password_file)
        self.assert_clean(self.check(path))

    def test_wrong_pfx_password_is_cert002_at_password_file(self):
        path, at = self.config(cert=self.pki.pfx, password_file=self.pki.wrong_password_file)
        res = self.check(path)
        self.assertEqual(res.returncode, 1, res.stdout)
        line = self.assert_only(res, "CERT002", (path, at["password_file"]))
        self.assertIn("wrong password", line)

    def test_pfx_password_missing_is_cert002_at_cert(self):
        path, at = self.config(cert=self.pki.pfx)
        res = self.check(path)
        self.assertEqual(res.returncode, 1, res.stdout)
        self.assertIn("password_file", self.assert_only(res, "CERT002", (path, at["cert"])))

    def test_pem_chain_and_encrypted_key(self):
        path, _ = self.config(cert=self.pki.chain, key=self.pki.encrypted_key, password_file=self.pki.password_file)
        self.assert_clean(self.check(path))
        path, at = self.config(cert=self.pki.chain, key=self.pki.encrypted_key)
        res = self.check(path)
        self.assertEqual(res.returncode, 1, res.stdout)
        self.assertIn("encrypted", self.assert_only(res, "CERT002", (path, at["key"])))
        path, at = self.config(cert=self.pki.chain, key=self.pki.encrypted_key, password_file=self.pki.wrong_password_file)
        self.assert_only(self.check(path), "CERT002", (path, at["password_file"]))

    def test_key_not_matching_is_cert003_at_key(self):
        path, at = self.config(cert=self.pki.chain, key=self.pki.other_key)
        res = self.check(path)
        self.assertEqual(res.returncode, 1, res.stdout)
        self.assertIn("does not belong", self.assert_only(res, "CERT003", (path, at["key"])))

    def test_unreadable_certificate_is_cert001(self):
        junk = self.write("real.pfx", "this is not a certificate\n")
        path, at = self.config(cert=junk, key=self.pki.key)
        res = self.check(path)
        self.assertEqual(res.returncode, 1, res.stdout)
        self.assert_only(res, "CERT001", (path, at["cert"]))

    def test_expired_and_not_yet_valid_are_cert004_expiring_soon_cert005(self):
        cert, key = self.pki.leaf_between("expired", "20200101000000Z", "20200201000000Z")
        path, at = self.config(cert=cert, key=key)
        res = self.check(path)
        self.assertEqual(res.returncode, 1, res.stdout)
        self.assertIn("expired on 2020-02-01", self.assert_only(res, "CERT004", (path, at["cert"])))
        cert, key = self.pki.leaf_between("future", "20990101000000Z", "20991231000000Z")
        path, at = self.config(cert=cert, key=key)
        self.assertIn("not valid before 2099-01-01", self.assert_only(self.check(path), "CERT004", (path, at["cert"])))
        cert, key = self.pki.leaf_with_days("soon", 10)
        path, at = self.config(cert=cert, key=key)
        res = self.check(path)
        self.assertEqual(res.returncode, 0, res.stdout)
        self.assert_only(res, "CERT005", (path, at["cert"]), "warning")

    def test_missing_intermediate_is_cert006_warning(self):
        path, at = self.config(cert=self.pki.leaf, key=self.pki.key)
        res = self.check(path)
        self.assertEqual(res.returncode, 0, res.stdout)
        self.assertIn("Contoso Test Issuing CA", self.assert_only(res, "CERT006", (path, at["cert"]), "warning"))
        path, _ = self.config(cert=self.pki.chain, key=self.pki.key)
        self.assert_clean(self.check(path))

    def test_names_no_certificate_covers(self):
        path, at = self.config(names=("mail.contoso.com", "owa.fabrikam.com"), cert=self.pki.chain, key=self.pki.key)
        res = self.check(path)
        self.assertEqual(res.returncode, 1, res.stdout)
        self.assertIn("'owa.fabrikam.com'", self.assert_only(res, "CERT007", (path, at["names"])))
        path, at = self.config(public_names=("mail.contoso.com", "webmail.contoso.com"), cert=self.pki.chain, key=self.pki.key)
        res = self.check(path)
        self.assertEqual(res.returncode, 0, res.stdout)
        lines = self.findings(res, "CERT008")
        self.assertEqual(len(lines), 1, res.stdout)
        self.assertIn("'webmail.contoso.com'", lines[0])

    def test_password_file_open_to_others_is_cert009(self):
        loose = self.write("loose.txt", byo_pki.PASSWORD + "\n")
        os.chmod(loose, 0o644)
        path, at = self.config(cert=self.pki.pfx, password_file=loose)
        res = self.check(path)
        self.assertEqual(res.returncode, 0, res.stdout)
        self.assert_only(res, "CERT009", (path, at["password_file"]), "warning")

    def test_run_refuses_a_wrong_password_with_checks_line(self):
        path, at = self.config(cert=self.pki.pfx, password_file=self.pki.wrong_password_file)
        try:
            res = run("run", "-c", path, timeout=20)
        except subprocess.TimeoutExpired:
            self.fail("run started with a wrong PFX password")
        self.assertEqual(res.returncode, 1, res.stdout + res.stderr)
        self.assertIn("%s:%d:1: error CERT002" % (path, at["password_file"]), res.stderr)

    def test_certs_show_a_pfx(self):
        res = run("certs", "show", self.pki.pfx, "--password-file", self.pki.password_file)
        self.assertEqual(res.returncode, 0, res.stderr)
        self.assertIn("name autodiscover.contoso.com", res.stdout)
        self.assertIn("key yes", res.stdout)
        self.assertIn("chain /CN=Contoso Test Issuing CA", res.stdout)
        res = run("certs", "show", self.pki.pfx)
        self.assertEqual(res.returncode, 1, res.stdout)
        self.assertIn("password", res.stderr)


class ExtendedProtection(TempFiles):
    """check -t: with Extended Protection, the tier terminating the client's TLS must present
    Exchange's own certificate for the published name (issue 17, item 4)."""

    @classmethod
    def setUpClass(cls):
        cls._pki_dir = tempfile.TemporaryDirectory(prefix="dmz-ep-pki-")
        cls.pki = byo_pki.ByoPki(cls._pki_dir.name)
        cls.other = cls.pki.leaf_with_days("other", 60)

    @classmethod
    def tearDownClass(cls):
        cls._pki_dir.cleanup()

    LAB_WEB_CERT = 'certificates = [{ names = ["mail.contoso.com", "autodiscover.contoso.com"], issuer = "lab" }]'

    def topology(self, front_end_cert=None, host_cert=True, extended_protection=None):
        """The default lab, with Exchange's certificate given to the host and the front-end's
        web certificate replaced by `front_end_cert` (a dict of keys), in a copy."""
        shutil.copytree(os.path.join(os.path.dirname(TOPOLOGY), "exchange-two-tier"), os.path.join(self.dir, "exchange-two-tier"))
        fe_path = os.path.join(self.dir, "exchange-two-tier", "front-end.toml")
        with open(fe_path, encoding="utf-8") as f:
            fe = f.read()
        self.assertIn(self.LAB_WEB_CERT, fe)
        if front_end_cert:
            entry = ", ".join('%s = %s' % (k, json.dumps(v)) for k, v in front_end_cert.items())
            fe = fe.replace(self.LAB_WEB_CERT, 'certificates = [{ names = ["mail.contoso.com", "autodiscover.contoso.com"], %s }]' % entry)
        with open(fe_path, "w", encoding="utf-8") as f:
            f.write(fe)
        line = next(i + 1 for i, l in enumerate(fe.splitlines()) if l.startswith("certificates = [{ names = [\"mail.contoso.com\", \"auto"))
        with open(TOPOLOGY, encoding="utf-8") as f:
            topo = f.read()
        extra = ""
        if host_cert:
            extra += 'certificate = { cert = %s, password_file = %s }\n' % (json.dumps(self.pki.pfx), json.dumps(self.pki.password_file))
        if extended_protection is not None:
            extra += "extended_protection = %s\n" % ("true" if extended_protection else "false")
        topo = topo.replace("[hosts.exchange]\n", "[hosts.exchange]\n" + extra, 1)
        return self.write("topology.toml", topo), fe_path, line

    def ep_findings(self, path):
        res = run("check", "-q", "-t", path)
        return res, [l for l in res.stdout.splitlines() if " EXCH004: " in l]

    def test_a_lab_certificate_in_front_of_exchanges_own_is_exch004(self):
        path, fe, line = self.topology()
        res, found = self.ep_findings(path)
        self.assertEqual(len(found), 1, res.stdout)
        self.assertTrue(found[0].startswith("%s:%d:" % (fe, line)), found[0])
        self.assertIn("warning EXCH004", found[0])
        self.assertIn("Export-ExchangeCertificate", res.stdout, "the hint says how to fix it")

    def test_a_different_certificate_is_exch004_and_exchanges_own_is_clean(self):
        cert, key = self.other
        path, fe, line = self.topology({"cert": cert, "key": key})
        res, found = self.ep_findings(path)
        self.assertEqual(len(found), 1, res.stdout)
        self.assertTrue(found[0].startswith("%s:%d:" % (fe, line)), found[0])
        shutil.rmtree(os.path.join(self.dir, "exchange-two-tier"))
        path, _, _ = self.topology({"cert": self.pki.pfx, "password_file": self.pki.password_file})
        res, found = self.ep_findings(path)
        self.assertEqual(found, [], res.stdout)
        self.assertEqual(res.returncode, 0, res.stdout)

    def test_no_finding_without_extended_protection_or_without_the_hosts_certificate(self):
        path, _, _ = self.topology(extended_protection=False)
        res, found = self.ep_findings(path)
        self.assertEqual(found, [], res.stdout)
        shutil.rmtree(os.path.join(self.dir, "exchange-two-tier"))
        path, _, _ = self.topology(host_cert=False)
        res, found = self.ep_findings(path)
        self.assertEqual(found, [], res.stdout)


class SmtpRecipientForm(unittest.TestCase):
    def test_smtp_colon_address_is_the_recipient(self):
        res = explain("smtp:admin@contoso.com")
        self.assertEqual(res.returncode, 0, res.stdout + res.stderr)
        self.assertIn("RCPT TO:<admin@contoso.com>", res.stdout)
        res = explain("smtp:victim@fabrikam.com")
        self.assertEqual(res.returncode, 1)
        self.assertIn("550 5.7.1", res.stdout)


class ExplainUserGroups(TempFiles):
    """explain --user takes the user's groups from the user store (dmzproxy users)."""

    def test_groups_from_the_store_decide_a_group_rule(self):
        store = os.path.join(self.dir, "users.toml")
        cfgdir = os.path.join(self.dir, "t")
        os.makedirs(cfgdir)
        topo = self.write("t.toml", """
[topology]
name = "g"
[networks.External]
ranges = ["127.10.0.0/16"]
[networks.Internal]
ranges = ["127.30.0.0/16"]
[instances.edge]
role = "single"
legs = [{ network = "External", address = "127.10.0.10" }, { network = "Internal", address = "127.30.0.10" }]
[instances.edge.config.listeners.web]
protocol = "http"
networks = ["External"]
port = 80
authentication = "basic"
[instances.edge.config.groups.mail-users]
[[instances.edge.config.rules]]
name = "EWS for mail-users"
action = "allow"
paths = ["/EWS"]
groups = ["mail-users"]
target = { host = "exchange", port = 80 }
[hosts.exchange]
network = "Internal"
address = "127.30.0.50"
names = ["mail.contoso.com"]
services = [{ name = "web", protocol = "http", port = 80 }]
[names]
"mail.contoso.com" = "edge"
""")
        for name, groups in (("alice", ["-g", "mail-users"]), ("bob", [])):
            subprocess.run([DMZPROXY, "users", "--file", store, "add", name, *groups, "--password-stdin"], input="pw\n",
                           capture_output=True, text=True, timeout=60, check=True)
        args = ["explain", "-t", topo, "--from", CLIENT, "--users-file", store]
        alice = run(*args, "--user", "alice", "http://mail.contoso.com/EWS/Exchange.asmx")
        self.assertEqual(alice.returncode, 0, alice.stdout + alice.stderr)
        bob = run(*args, "--user", "bob", "http://mail.contoso.com/EWS/Exchange.asmx")
        self.assertEqual(bob.returncode, 1, bob.stdout)
        anon = run(*args, "http://mail.contoso.com/EWS/Exchange.asmx")
        self.assertEqual(anon.returncode, 1)
        self.assertIn("AUTH FAULT", anon.stdout)


class UsersStoreFile(TempFiles):
    """dmzproxy users reads its file through the config loaders' TOML reader: a malformed
    store is named by file:line:column and left untouched."""

    def test_malformed_store_names_file_line_column_and_is_not_overwritten(self):
        text = '[users.alice]\npassword = "$scrypt$x"\ngruops = ["mail"]\n'
        store = self.write("users.toml", text)
        res = subprocess.run([DMZPROXY, "users", "--file", store, "add", "bob", "--password-stdin"], input="pw\n",
                             capture_output=True, text=True, timeout=60, check=False)
        self.assertEqual(res.returncode, 1, res.stdout + res.stderr)
        self.assertIn(store + ":3:1: error CFG002: unknown key 'gruops'", res.stderr)
        self.assertIn("did you mean 'groups'?", res.stderr)
        with open(store) as f:
            self.assertEqual(f.read(), text, "nothing is written over a store that did not load")

    def test_toml_syntax_error_names_file_line_column(self):
        store = self.write("users.toml", '[users.alice]\npassword = "$scrypt$x\n')
        res = run("users", "--file", store, "list")
        self.assertEqual(res.returncode, 1, res.stdout + res.stderr)
        self.assertRegex(res.stderr, "^" + store.replace(".", r"\.") + r":2:\d+: error CFG001: TOML syntax")

    def test_add_and_list_round_trip(self):
        store = os.path.join(self.dir, "users.toml")
        res = subprocess.run([DMZPROXY, "users", "--file", store, "add", "carol", "-g", "mail", "--password-stdin"],
                             input="pw\n", capture_output=True, text=True, timeout=60, check=False)
        self.assertEqual(res.returncode, 0, res.stderr)
        res = run("users", "--file", store, "list")
        self.assertEqual(res.returncode, 0, res.stderr)
        self.assertEqual(res.stdout, "carol  groups: mail\n")


class RunRefusesWhatCheckRefuses(TempFiles):
    """`run` and `lab up` start nothing that `check` calls broken (issue 17, items 1 and 2)."""

    DUP = ('[instance]\nname = "dup"\n\n[listeners.web]\nprotocol = "http"\nbind = ["127.3.17.1:8080"]\n\n'
           '[listeners.tls]\nprotocol = "https"\nbind = ["127.3.17.1:8080"]\n'
           'certificates = [{ names = ["mail.contoso.com"], cert = "pki/mail.contoso.com.pem", key = "pki/mail.contoso.com.key" }]\n\n'
           '[[rules]]\nname = "OWA"\naction = "allow"\npaths = ["/owa"]\n'
           'target = { address = "127.3.17.2", port = 80 }\n')

    def run_briefly(self, *args):
        # A run that wrongly starts would serve forever: the timeout bounds it, and its
        # expiry is the failure.
        try:
            return run("run", *args, "--state", self.dir, timeout=20)
        except subprocess.TimeoutExpired:
            self.fail("run started although the config has an error")

    def test_duplicate_listener_port_is_refused_by_run_with_check_lines(self):
        made = run("certs", "--state", self.dir, "issue", "mail.contoso.com")
        self.assertEqual(made.returncode, 0, made.stderr)
        path = self.write("dup.toml", self.DUP)
        chk = run("check", "-q", "-c", path)
        self.assertEqual(chk.returncode, 1, chk.stdout)
        lst = [l for l in chk.stdout.splitlines() if "LST001" in l]
        self.assertEqual(len(lst), 1, chk.stdout)
        self.assertIn("one socket cannot serve both", lst[0] + chk.stdout)
        self.assertNotIn("Hub transport", chk.stdout, "the SMTP hint is for SMTP listeners only")
        res = self.run_briefly("-c", path)
        self.assertEqual(res.returncode, 1, res.stdout + res.stderr)
        self.assertIn(lst[0].split(" [")[0], res.stderr, "run prints the same file:line:column line as check")
        self.assertIn("nothing was started", res.stderr)
        self.assertNotRegex(res.stdout + res.stderr, r"\bready\b")

    def test_a_directory_is_not_a_config(self):
        for cmd in (["check", "-c", self.dir], ["check", "-t", self.dir]):
            res = run(*cmd)
            self.assertEqual(res.returncode, 2, res.stdout + res.stderr)
            self.assertIn("is a directory", res.stdout + res.stderr)
        res = self.run_briefly("-c", self.dir)
        self.assertEqual(res.returncode, 2, res.stdout + res.stderr)
        self.assertIn("is a directory", res.stderr)

    def test_an_empty_file_is_not_a_config(self):
        for text in ("", "\n# nothing but a comment\n"):
            path = self.write("empty.toml", text)
            res = run("check", "-c", path)
            self.assertEqual(res.returncode, 2, res.stdout + res.stderr)
            self.assertIn(f"{path}:1:1: error CFG009", res.stdout)
            res = run("check", "-t", path)
            self.assertEqual(res.returncode, 2, res.stdout + res.stderr)
            res = self.run_briefly("-c", path)
            self.assertEqual(res.returncode, 2, res.stdout + res.stderr)
            self.assertIn("CFG009", res.stderr)

    def test_an_instance_without_listener_is_an_error(self):
        path = self.write("nolistener.toml", '[instance]\nname = "quiet"\n')
        res = run("check", "-c", path)
        self.assertEqual(res.returncode, 1, res.stdout + res.stderr)
        self.assertIn("error LST004", res.stdout)
        res = self.run_briefly("-c", path)
        self.assertEqual(res.returncode, 1, res.stdout + res.stderr)
        self.assertIn("LST004", res.stderr)

    def test_a_topology_with_an_error_does_not_run_unless_broken_on_purpose(self):
        # The scenario without its list: run -t refuses it, with check's line.
        with open(os.path.join(SCENARIOS, "open-relay.toml"), encoding="utf-8") as f:
            text = f.read()
        self.assertIn('broken_on_purpose = ["SMTP001"]', text)
        stripped = self.write("open-relay.toml", "\n".join(l for l in text.splitlines() if not l.startswith("broken_on_purpose")))
        res = self.run_briefly("-t", stripped, "--instance", "back-end", "--shift", "150")
        self.assertEqual(res.returncode, 1, res.stdout + res.stderr)
        self.assertIn("error SMTP001", res.stderr)
        # check still reports the fault of a scenario broken on purpose.
        res = run("check", "-q", "-t", os.path.join(SCENARIOS, "open-relay.toml"))
        self.assertEqual(res.returncode, 1, res.stdout)
        self.assertIn("error SMTP001", res.stdout)

    def test_a_stale_broken_on_purpose_list_is_a_warning(self):
        with open(TOPOLOGY, encoding="utf-8") as f:
            text = f.read()
        text = text.replace("[topology]\n", '[topology]\nbroken_on_purpose = ["SMTP001"]\n', 1)
        # A copy beside a copy of its instance configs (they are named relative to it).
        shutil.copytree(os.path.join(os.path.dirname(TOPOLOGY), "exchange-two-tier"), os.path.join(self.dir, "exchange-two-tier"))
        path = self.write("stale.toml", text)
        res = run("check", "-q", "-t", path)
        self.assertEqual(res.returncode, 0, res.stdout)
        self.assertIn("warning TOP010: broken_on_purpose lists SMTP001", res.stdout)


class BindNames(TempFiles):
    def test_a_name_in_bind_says_why_and_what_to_write(self):
        path = self.write("lh.toml", '[instance]\nname = "x"\n[listeners.web]\nprotocol = "http"\nbind = ["localhost:8080"]\n')
        res = run("check", "-q", "-c", path)
        self.assertEqual(res.returncode, 1, res.stdout)
        self.assertIn(f"{path}:5:9: error CFG004: 'localhost' is a name", res.stdout)
        self.assertIn('write "127.0.0.1:8080"', res.stdout)
        path = self.write("bad.toml", '[instance]\nname = "x"\n[listeners.web]\nprotocol = "http"\nbind = ["1.2.3:80"]\n')
        self.assertIn("is not ADDRESS:PORT", run("check", "-q", "-c", path).stdout)


class OneRootErrorOneMessage(TempFiles):
    """A mistake is reported once, at its root, not again by everything that depends on it."""

    def topology_with(self, old, new):
        shutil.copytree(os.path.join(os.path.dirname(TOPOLOGY), "exchange-two-tier"), os.path.join(self.dir, "exchange-two-tier"))
        with open(TOPOLOGY, encoding="utf-8") as f:
            text = f.read()
        self.assertIn(old, text)
        return self.write("t.toml", text.replace(old, new, 1))

    def errors(self, res):
        return [l for l in res.stdout.splitlines() if ": error " in l]

    def test_a_bad_cidr_is_one_error(self):
        path = self.topology_with('ranges = ["127.20.0.0/16"]', 'ranges = ["127.20.0.0/33"]')
        errs = self.errors(run("check", "-q", "-t", path))
        self.assertEqual(len(errs), 1, errs)
        self.assertIn("invalid CIDR", errs[0])

    def test_overlapping_networks_are_one_net001(self):
        path = self.topology_with('ranges = ["127.30.0.0/16"]', 'ranges = ["127.30.0.0/16", "127.20.5.0/24"]')
        errs = self.errors(run("check", "-q", "-t", path))
        self.assertEqual([e for e in errs if "NET001" in e][:1], [e for e in errs if "NET001" in e], errs)
        self.assertEqual(len(errs), 1, errs)

    def test_a_rule_without_action_is_one_error(self):
        path = self.write("cfg.toml", '[instance]\nname = "x"\n[listeners.web]\nprotocol = "http"\nbind = ["127.0.0.1:8080"]\n'
                                      '[[rules]]\nname = "OWA"\npaths = ["/owa"]\ntarget = { address = "127.0.0.2", port = 80 }\n')
        errs = self.errors(run("check", "-q", "-c", path))
        self.assertEqual(len(errs), 1, errs)
        self.assertIn("missing required key 'rules.OWA.action'", errs[0])
        self.assertNotIn("deny rule", "\n".join(errs))


class DiagnoseADeployment(TempFiles):
    """diagnose without a lab: the topology names the instances' admin endpoints."""

    def copy_topology(self, admin_port):
        import re
        moved = lambda text: re.sub(r"127\.(10|20|30)\.", lambda m: "127.%d." % (int(m.group(1)) + 67), text)
        os.makedirs(os.path.join(self.dir, "exchange-two-tier"))
        with open(TOPOLOGY, encoding="utf-8") as f:
            topo = self.write("site.toml", moved(f.read()))
        for name in ("front-end", "back-end"):
            with open(os.path.join(os.path.dirname(TOPOLOGY), "exchange-two-tier", name + ".toml"), encoding="utf-8") as f:
                text = moved(f.read())
            if name == "front-end":
                text = text.replace("[instance]\n", '[instance]\nadmin = "127.0.0.1:%d"\n' % admin_port, 1)
            self.write(os.path.join("exchange-two-tier", name + ".toml"), text)
        return topo

    def test_no_lab_and_no_topology_exits_2_and_says_what_to_give(self):
        res = run("diagnose", "--state", self.dir, "https://mail.contoso.com/owa/")
        self.assertEqual(res.returncode, 2, res.stdout + res.stderr)
        self.assertIn("no lab is running from " + self.dir, res.stderr)
        self.assertIn("name its topology with -t", res.stderr)

    def test_an_unreachable_admin_endpoint_leaves_its_hop_unprobed_not_faulted(self):
        import socket
        with socket.socket() as s:  # a loopback port nobody listens on
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        topo = self.copy_topology(port)
        res = run("diagnose", "--state", os.path.join(self.dir, "nothing"), "-t", topo, "--json",
                  "https://mail.contoso.com/owa/")
        self.assertEqual(res.returncode, 1, res.stdout + res.stderr)
        d = json.loads(res.stdout)
        hop = [h for h in d["hops"] if h["from"] == "front-end"][0]
        self.assertFalse(hop["probed"], hop)
        self.assertEqual(hop["probed_by"], "front-end")
        self.assertIn("asking 'front-end' failed: cannot connect to http://127.0.0.1:%d" % port, hop["tcp"])
        # Nothing runs at the front-end's address: the client's hop is the fault, not the unasked one.
        self.assertEqual(d["verdict"], "network-fault")
        self.assertEqual(d["hop"], "client -> front-end")
