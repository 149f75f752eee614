#include "auth/forms_cookie.hpp"

#include <fcntl.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>
#include <openssl/sha.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cctype>
#include <cerrno>
#include <charconv>
#include <cstring>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <vector>

#include "dmz/proxy/users.hpp"

namespace dmz::proxy {

namespace {

constexpr std::size_t key_bytes = 32;

std::string hex(const unsigned char* p, std::size_t n) {
    static const char* d = "0123456789abcdef";
    std::string out;
    for (std::size_t i = 0; i < n; ++i) {
        out += d[p[i] >> 4];
        out += d[p[i] & 15];
    }
    return out;
}

std::optional<std::string> unhex(std::string_view s) {
    if (s.size() % 2) return std::nullopt;
    std::string out;
    for (std::size_t i = 0; i < s.size(); i += 2) {
        unsigned v = 0;
        auto [p, ec] = std::from_chars(s.data() + i, s.data() + i + 2, v, 16);
        if (ec != std::errc{} || p != s.data() + i + 2) return std::nullopt;
        out += static_cast<char>(v);
    }
    return out;
}

std::string hmac(const std::string& key, std::string_view data) {
    unsigned char out[EVP_MAX_MD_SIZE];
    unsigned int n = 0;
    HMAC(EVP_sha256(), key.data(), static_cast<int>(key.size()), reinterpret_cast<const unsigned char*>(data.data()), data.size(), out,
         &n);
    return std::string(reinterpret_cast<char*>(out), n);
}

std::string random_bytes(std::size_t n) {
    std::string s(n, '\0');
    if (RAND_bytes(reinterpret_cast<unsigned char*>(s.data()), static_cast<int>(n)) != 1) throw std::runtime_error("RAND_bytes failed");
    return s;
}

/// AES-256-GCM: iv (12) | ciphertext | tag (16).
std::string gcm_seal(const std::string& key, const std::string& plain) {
    auto iv = random_bytes(12);
    std::string out = iv;
    out.resize(12 + plain.size() + 16);
    auto* ctx = EVP_CIPHER_CTX_new();
    int len = 0, fin = 0;
    bool ok = ctx && EVP_EncryptInit_ex(ctx, EVP_aes_256_gcm(), nullptr, reinterpret_cast<const unsigned char*>(key.data()),
                                        reinterpret_cast<const unsigned char*>(iv.data())) == 1 &&
              EVP_EncryptUpdate(ctx, reinterpret_cast<unsigned char*>(out.data() + 12), &len,
                                reinterpret_cast<const unsigned char*>(plain.data()), static_cast<int>(plain.size())) == 1 &&
              EVP_EncryptFinal_ex(ctx, reinterpret_cast<unsigned char*>(out.data() + 12 + len), &fin) == 1 &&
              EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_GET_TAG, 16, out.data() + 12 + plain.size()) == 1;
    EVP_CIPHER_CTX_free(ctx);
    if (!ok) throw std::runtime_error("AES-256-GCM sealing failed");
    return out;
}

std::optional<std::string> gcm_open(const std::string& key, std::string_view sealed) {
    if (sealed.size() < 28) return std::nullopt;
    std::string plain(sealed.size() - 28, '\0');
    std::string tag(sealed.substr(sealed.size() - 16));
    auto* ctx = EVP_CIPHER_CTX_new();
    int len = 0, fin = 0;
    bool ok = ctx && EVP_DecryptInit_ex(ctx, EVP_aes_256_gcm(), nullptr, reinterpret_cast<const unsigned char*>(key.data()),
                                        reinterpret_cast<const unsigned char*>(sealed.data())) == 1 &&
              EVP_DecryptUpdate(ctx, reinterpret_cast<unsigned char*>(plain.data()), &len,
                                reinterpret_cast<const unsigned char*>(sealed.data() + 12), static_cast<int>(plain.size())) == 1 &&
              EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_TAG, 16, tag.data()) == 1 &&
              EVP_DecryptFinal_ex(ctx, reinterpret_cast<unsigned char*>(plain.data() + len), &fin) == 1;
    EVP_CIPHER_CTX_free(ctx);
    if (!ok) return std::nullopt;
    return plain;
}

std::optional<std::int64_t> number(std::string_view s) {
    std::int64_t v = 0;
    auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
    if (ec != std::errc{} || p != s.data() + s.size()) return std::nullopt;
    return v;
}

}  // namespace

session_sealer::session_sealer(const std::string& key)
    : mac_key_(hmac(key, "dmzproxy forms session mac v1")), enc_key_(hmac(key, "dmzproxy forms session password v1")) {}

std::shared_ptr<const session_sealer> session_sealer::open(const std::string& key_file) {
    auto read = [&]() -> std::optional<std::string> {
        std::ifstream f(key_file);
        if (!f) return std::nullopt;
        std::string line;
        std::getline(f, line);
        auto k = unhex(line);
        if (!k || k->size() != key_bytes)
            throw std::runtime_error(key_file + ":1:1: a session key is " + std::to_string(key_bytes * 2) +
                                     " hexadecimal digits on one line");
        return k;
    };
    if (auto k = read()) return std::make_shared<const session_sealer>(*k);
    // Create: write a temporary file, then link() it into place, which fails if another
    // instance got there first; then everyone reads the one that won.
    auto tmp = key_file + ".tmp." + std::to_string(::getpid());
    int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0) throw std::runtime_error("cannot create the session key " + key_file + ": " + std::strerror(errno));
    auto raw = random_bytes(key_bytes);
    auto text = hex(reinterpret_cast<const unsigned char*>(raw.data()), raw.size()) + "\n";
    bool ok = ::write(fd, text.data(), text.size()) == static_cast<ssize_t>(text.size()) && ::fsync(fd) == 0;
    ::close(fd);
    if (!ok || (::link(tmp.c_str(), key_file.c_str()) != 0 && errno != EEXIST)) {
        auto why = std::string(std::strerror(errno));
        ::unlink(tmp.c_str());
        throw std::runtime_error("cannot create the session key " + key_file + ": " + why);
    }
    ::unlink(tmp.c_str());
    auto k = read();
    if (!k) throw std::runtime_error("cannot read the session key " + key_file);
    return std::make_shared<const session_sealer>(*k);
}

std::string session_sealer::seal(const forms_session& s) const {
    std::string fields = s.user + '\n' + std::to_string(s.issued) + '\n' + std::to_string(s.last) + '\n' + s.generation + '\n' + s.id +
                         '\n' + (s.password.empty() ? std::string() : base64url_encode(gcm_seal(enc_key_, s.password)));
    auto body = "v1." + base64url_encode(fields);
    return body + "." + base64url_encode(hmac(mac_key_, body));
}

std::optional<forms_session> session_sealer::unseal(std::string_view value) const {
    if (value.size() > 4096 || value.substr(0, 3) != "v1.") return std::nullopt;
    auto dot = value.rfind('.');
    if (dot <= 3) return std::nullopt;
    auto body = value.substr(0, dot);
    // Compared as text: base64 has spare bits in its last character, and a cookie that
    // decodes to the right MAC from another spelling is still not one we wrote.
    auto want = base64url_encode(hmac(mac_key_, body));
    auto mac = value.substr(dot + 1);
    if (mac.size() != want.size() || CRYPTO_memcmp(mac.data(), want.data(), want.size()) != 0) return std::nullopt;
    auto fields = base64url_decode(body.substr(3));
    if (!fields) return std::nullopt;
    std::vector<std::string_view> f;
    std::string_view rest = *fields;
    while (true) {
        auto nl = rest.find('\n');
        f.push_back(rest.substr(0, nl));
        if (nl == std::string_view::npos) break;
        rest.remove_prefix(nl + 1);
    }
    if (f.size() != 6 || f[0].empty()) return std::nullopt;
    forms_session s;
    s.user = std::string(f[0]);
    auto issued = number(f[1]), last = number(f[2]);
    if (!issued || !last) return std::nullopt;
    s.issued = *issued;
    s.last = *last;
    s.generation = std::string(f[3]);
    s.id = std::string(f[4]);
    if (!f[5].empty()) {
        auto sealed = base64url_decode(f[5]);
        auto pw = sealed ? gcm_open(enc_key_, *sealed) : std::nullopt;
        if (!pw) return std::nullopt;
        s.password = *pw;
    }
    return s;
}

void revoked_sessions::revoke(const std::string& id, std::chrono::system_clock::time_point until) {
    std::lock_guard lock(m_);
    auto now = std::chrono::system_clock::now();
    if (ids_.size() > 10000)
        for (auto it = ids_.begin(); it != ids_.end();) it = it->second < now ? ids_.erase(it) : std::next(it);
    ids_[id] = until;
}

bool revoked_sessions::revoked(const std::string& id) {
    std::lock_guard lock(m_);
    return ids_.count(id) != 0;
}

std::string hash_generation(const std::string& stored_hash) {
    unsigned char d[SHA256_DIGEST_LENGTH];
    SHA256(reinterpret_cast<const unsigned char*>(stored_hash.data()), stored_hash.size(), d);
    return hex(d, 6);
}

std::string base64url_encode(std::string_view in) {
    auto s = base64_encode(std::string(in));
    std::string out;
    for (char c : s) {
        if (c == '=') break;
        out += c == '+' ? '-' : c == '/' ? '_' : c;
    }
    return out;
}

std::optional<std::string> base64url_decode(std::string_view in) {
    std::string s;
    for (char c : in) {
        if (c == '+' || c == '/' || c == '=') return std::nullopt;
        s += c == '-' ? '+' : c == '_' ? '/' : c;
    }
    while (s.size() % 4) s += '=';
    return base64_decode(s);
}

std::optional<std::string> form_field(std::string_view body, std::string_view name) {
    auto hexval = [](char c) -> int {
        if (c >= '0' && c <= '9') return c - '0';
        if (c >= 'a' && c <= 'f') return c - 'a' + 10;
        if (c >= 'A' && c <= 'F') return c - 'A' + 10;
        return -1;
    };
    while (!body.empty()) {
        auto amp = body.find('&');
        auto pair = body.substr(0, amp);
        body = amp == std::string_view::npos ? std::string_view() : body.substr(amp + 1);
        auto eq = pair.find('=');
        if (pair.substr(0, eq) != name) continue;
        auto v = eq == std::string_view::npos ? std::string_view() : pair.substr(eq + 1);
        std::string out;
        for (std::size_t i = 0; i < v.size(); ++i) {
            if (v[i] == '+') out += ' ';
            else if (v[i] == '%') {
                if (i + 2 >= v.size()) return std::nullopt;
                int hi = hexval(v[i + 1]), lo = hexval(v[i + 2]);
                if (hi < 0 || lo < 0) return std::nullopt;
                out += static_cast<char>(hi * 16 + lo);
                i += 2;
            } else {
                out += v[i];
            }
        }
        return out;
    }
    return std::nullopt;
}

std::string url_encode(std::string_view in) {
    static const char* d = "0123456789ABCDEF";
    std::string out;
    for (unsigned char c : in) {
        if (std::isalnum(c) || c == '-' || c == '.' || c == '_' || c == '~') out += static_cast<char>(c);
        else {
            out += '%';
            out += d[c >> 4];
            out += d[c & 15];
        }
    }
    return out;
}

}  // namespace dmz::proxy
