"""Certificates as an admin brings them, made at test time with the openssl command line:
a root CA, an intermediate, a leaf for the published names, and the leaf as a PFX (with and
without a password, also with the legacy RC2 encryption of older Windows exports), an
encrypted PEM key, an expired and a soon-expiring leaf. OpenSSL 3.0: `openssl ca
-startdate/-enddate` gives past dates (x509 -days refuses them)."""

import os
import secrets
import subprocess

PASSWORD = "Exchange-Export-1"


def openssl(*args, cwd=None):
    res = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False)
    if res.returncode != 0:
        raise RuntimeError("openssl %s failed: %s" % (" ".join(args), res.stderr))
    return res


class ByoPki:
    def __init__(self, directory, names=("mail.contoso.com", "autodiscover.contoso.com")):
        self.dir = directory
        os.makedirs(directory, exist_ok=True)
        self.names = list(names)
        self.root, self.root_key = self._ca("root", "/CN=Contoso Test Root CA", None)
        self.inter, self.inter_key = self._ca("inter", "/CN=Contoso Test Issuing CA", (self.root, self.root_key))
        self.leaf, self.key = self._leaf("mail", self.names)
        self.chain = self.path("chain.pem")
        self._concat(self.chain, self.leaf, self.inter)
        self.password_file = self.secret("password.txt", PASSWORD + "\n")
        self.wrong_password_file = self.secret("wrong.txt", "not-the-password\n")
        self.pfx = self.path("mail.pfx")
        openssl("pkcs12", "-export", "-in", self.leaf, "-inkey", self.key, "-certfile", self.inter,
                "-passout", "file:" + self.password_file, "-out", self.pfx)
        self.pfx_open = self.path("open.pfx")
        openssl("pkcs12", "-export", "-in", self.leaf, "-inkey", self.key, "-certfile", self.inter,
                "-passout", "pass:", "-out", self.pfx_open)
        self.encrypted_key = self.path("mail.enc.key")
        openssl("pkey", "-in", self.key, "-aes256", "-passout", "file:" + self.password_file, "-out", self.encrypted_key)
        self.other_key = self.path("other.key")
        openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", self.other_key)

    def path(self, name):
        return os.path.join(self.dir, name)

    def secret(self, name, text):
        p = self.path(name)
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        return p

    def _concat(self, out, *files):
        texts = []
        for f in files:
            with open(f, encoding="ascii") as i:
                texts.append(i.read())
        with open(out, "w", encoding="ascii") as o:
            o.write("".join(texts))

    def _ext(self, stem, text):
        p = self.path(stem + ".ext")
        with open(p, "w", encoding="ascii") as f:
            f.write(text)
        return p

    def _ca(self, stem, subject, issuer):
        key, cert = self.path(stem + ".key"), self.path(stem + ".pem")
        openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", key)
        if issuer is None:
            openssl("req", "-x509", "-new", "-key", key, "-sha256", "-days", "120", "-subj", subject,
                    "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
                    "-out", cert)
            return cert, key
        csr = self.path(stem + ".csr")
        openssl("req", "-new", "-key", key, "-subj", subject, "-out", csr)
        ext = self._ext(stem, "basicConstraints = critical,CA:TRUE,pathlen:0\nkeyUsage = critical,keyCertSign,cRLSign\n"
                              "subjectKeyIdentifier = hash\nauthorityKeyIdentifier = keyid,issuer\n")
        openssl("x509", "-req", "-in", csr, "-CA", issuer[0], "-CAkey", issuer[1], "-sha256", "-days", "90",
                "-set_serial", "0x" + secrets.token_hex(12), "-extfile", ext, "-out", cert)
        return cert, key

    def _leaf_ext(self, stem, names):
        return self._ext(stem, "basicConstraints = critical,CA:FALSE\nkeyUsage = critical,digitalSignature\n"
                               "extendedKeyUsage = serverAuth\nauthorityKeyIdentifier = keyid,issuer\n"
                               "subjectAltName = %s\n" % ",".join("DNS:" + n for n in names))

    def _leaf(self, stem, names, days="60"):
        key, csr, cert = self.path(stem + ".key"), self.path(stem + ".csr"), self.path(stem + ".pem")
        openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", key)
        openssl("req", "-new", "-key", key, "-subj", "/CN=" + names[0], "-out", csr)
        openssl("x509", "-req", "-in", csr, "-CA", self.inter, "-CAkey", self.inter_key, "-sha256", "-days", days,
                "-set_serial", "0x" + secrets.token_hex(12), "-extfile", self._leaf_ext(stem, names), "-out", cert)
        return cert, key

    def leaf_with_days(self, stem, days):
        """A leaf (chain file with the intermediate, and key) valid for `days` more days."""
        cert, key = self._leaf(stem, self.names, days=str(days))
        self._concat(cert, cert, self.inter)
        return cert, key

    def leaf_between(self, stem, start, end):
        """A leaf valid from `start` to `end` (YYYYMMDDHHMMSSZ), through `openssl ca`."""
        db = self.path(stem + "-db")
        os.makedirs(db, exist_ok=True)
        open(os.path.join(db, "index.txt"), "w", encoding="ascii").close()
        with open(os.path.join(db, "serial"), "w", encoding="ascii") as f:
            f.write(secrets.token_hex(8) + "\n")
        cnf = self._ext(stem + "-ca", "[ca]\ndefault_ca = t\n[t]\ndatabase = %s/index.txt\nserial = %s/serial\n"
                                      "new_certs_dir = %s\ndefault_md = sha256\npolicy = p\nunique_subject = no\n"
                                      "[p]\ncommonName = supplied\n[x]\nbasicConstraints = critical,CA:FALSE\n"
                                      "subjectAltName = %s\n" % (db, db, db, ",".join("DNS:" + n for n in self.names)))
        key, csr, cert = self.path(stem + ".key"), self.path(stem + ".csr"), self.path(stem + ".pem")
        openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", key)
        openssl("req", "-new", "-key", key, "-subj", "/CN=" + self.names[0], "-out", csr)
        openssl("ca", "-batch", "-config", cnf, "-cert", self.inter, "-keyfile", self.inter_key, "-in", csr,
                "-out", cert, "-startdate", start, "-enddate", end, "-extensions", "x", "-notext")
        self._concat(cert, cert, self.inter)
        return cert, key

    def legacy_pfx(self):
        """The PFX as older Windows exports it (RC2-40 / 3DES), or None without the legacy provider."""
        out = self.path("legacy.pfx")
        try:
            openssl("pkcs12", "-export", "-legacy", "-in", self.leaf, "-inkey", self.key, "-certfile", self.inter,
                    "-passout", "file:" + self.password_file, "-out", out)
        except RuntimeError:
            return None
        return out
