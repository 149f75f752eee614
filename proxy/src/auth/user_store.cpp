#include "dmz/proxy/users.hpp"

#include "dmz/rules/toml_reader.hpp"

#include <fcntl.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <sstream>
#include <stdexcept>

namespace dmz::proxy {

namespace {
constexpr int scrypt_log_n = 15, scrypt_r = 8, scrypt_p = 1;
constexpr std::size_t key_len = 32;

std::string derive(const std::string& password, const std::string& salt, int log_n, int r, int p) {
    std::string key(key_len, '\0');
    std::uint64_t n = 1ULL << log_n;
    if (EVP_PBE_scrypt(password.data(), password.size(), reinterpret_cast<const unsigned char*>(salt.data()), salt.size(), n,
                       static_cast<std::uint64_t>(r), static_cast<std::uint64_t>(p), 64ULL * 1024 * 1024,
                       reinterpret_cast<unsigned char*>(key.data()), key.size()) != 1)
        throw std::runtime_error("scrypt failed");
    return key;
}

/// A fixed hash to spend the same time on when the user does not exist.
const std::string& decoy_hash() {
    static const std::string h = hash_password("dmzproxy-decoy-password");
    return h;
}
}  // namespace

std::string base64_encode(const std::string& in) {
    std::string out(4 * ((in.size() + 2) / 3) + 1, '\0');
    int n = EVP_EncodeBlock(reinterpret_cast<unsigned char*>(out.data()), reinterpret_cast<const unsigned char*>(in.data()),
                            static_cast<int>(in.size()));
    out.resize(static_cast<std::size_t>(n));
    return out;
}

std::optional<std::string> base64_decode(const std::string& in) {
    if (in.size() % 4 != 0 || in.size() > 1 << 16) return std::nullopt;
    std::string out(3 * in.size() / 4 + 1, '\0');
    int n = EVP_DecodeBlock(reinterpret_cast<unsigned char*>(out.data()), reinterpret_cast<const unsigned char*>(in.data()),
                            static_cast<int>(in.size()));
    if (n < 0) return std::nullopt;
    std::size_t pad = 0;
    if (!in.empty() && in.back() == '=') ++pad;
    if (in.size() > 1 && in[in.size() - 2] == '=') ++pad;
    out.resize(static_cast<std::size_t>(n) - pad);
    return out;
}

std::string hash_password(const std::string& password) {
    std::string salt(16, '\0');
    // A salt that is not random would make equal passwords look equal: refuse to hash.
    if (RAND_bytes(reinterpret_cast<unsigned char*>(salt.data()), static_cast<int>(salt.size())) != 1)
        throw std::runtime_error("no random bytes for a password salt (RAND_bytes failed: " +
                                 std::string(ERR_error_string(ERR_get_error(), nullptr)) + ")");
    auto key = derive(password, salt, scrypt_log_n, scrypt_r, scrypt_p);
    return "$scrypt$ln=" + std::to_string(scrypt_log_n) + ",r=" + std::to_string(scrypt_r) + ",p=" + std::to_string(scrypt_p) +
           "$" + base64_encode(salt) + "$" + base64_encode(key);
}

bool check_password(const std::string& password, const std::string& hash) {
    int log_n = 0, r = 0, p = 0;
    char salt64[64] = {}, key64[128] = {};
    if (std::sscanf(hash.c_str(), "$scrypt$ln=%d,r=%d,p=%d$%63[^$]$%127s", &log_n, &r, &p, salt64, key64) != 5) return false;
    if (log_n < 10 || log_n > 20 || r < 1 || r > 32 || p < 1 || p > 16) return false;
    auto salt = base64_decode(salt64);
    auto want = base64_decode(key64);
    if (!salt || !want || want->size() != key_len) return false;
    auto got = derive(password, *salt, log_n, r, p);
    return CRYPTO_memcmp(got.data(), want->data(), key_len) == 0;
}

std::optional<user_store> user_store::load(const std::string& path, rules::diagnostics& out) {
    user_store s;
    std::error_code ec;
    if (!std::filesystem::exists(path, ec)) return s;  // a store nobody has written to yet
    auto errors = out.size();
    auto root = rules::parse_toml_file(path, out);
    if (!root) return std::nullopt;
    rules::toml_reader r(path, out);
    r.only_keys(*root, "", {"users"});
    if (auto* users = r.table(*root, "users", "")) {
        for (auto&& [k, v] : *users) {
            std::string name(k.str());
            auto* t = r.table(*users, name, "users");
            if (!t) continue;
            auto where = "users." + name;
            r.only_keys(*t, where, {"password", "groups"});
            stored_user u;
            u.name = name;
            u.hash = r.str(*t, "password", where, true).value_or("");
            u.groups = r.strings(*t, "groups", where);
            s.users_[u.name] = std::move(u);
        }
    }
    if (rules::has_errors({out.begin() + static_cast<std::ptrdiff_t>(errors), out.end()})) return std::nullopt;
    return s;
}

user_store user_store::load(const std::string& path) {
    rules::diagnostics d;
    auto s = load(path, d);
    if (s) return std::move(*s);
    // One line per problem, each starting with file:line:column, as the config loader says it.
    std::string msg;
    for (auto& x : d) {
        if (!msg.empty()) msg += "\n";
        msg += x.where.to_string() + ": " + x.code + ": " + x.message + (x.key.empty() ? "" : " [" + x.key + "]");
    }
    throw std::runtime_error(msg.empty() ? path + ": cannot read the user store" : msg);
}

void user_store::save(const std::string& path) const {
    std::ostringstream out;
    out << "# dmzproxy user store: managed with 'dmzproxy users'. Passwords are scrypt hashes.\n";
    for (auto& [name, u] : users_) {
        out << "\n[users." << toml::value<std::string>(name) << "]\npassword = " << toml::value<std::string>(u.hash) << "\ngroups = [";
        for (std::size_t i = 0; i < u.groups.size(); ++i) out << (i ? ", " : "") << toml::value<std::string>(u.groups[i]);
        out << "]\n";
    }
    auto tmp = path + ".tmp";
    int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0) throw std::runtime_error("cannot write '" + tmp + "': " + std::strerror(errno));
    auto text = out.str();
    bool ok = ::write(fd, text.data(), text.size()) == static_cast<ssize_t>(text.size());
    ::close(fd);
    if (!ok || std::rename(tmp.c_str(), path.c_str()) != 0)
        throw std::runtime_error("cannot write '" + path + "': " + std::strerror(errno));
}

const stored_user* user_store::find(const std::string& name) const {
    auto it = users_.find(name);
    return it == users_.end() ? nullptr : &it->second;
}

void user_store::set(const std::string& name, const std::string& password, const std::optional<std::vector<std::string>>& groups) {
    auto& u = users_[name];
    u.name = name;
    u.hash = hash_password(password);
    if (groups) u.groups = *groups;
}

bool user_store::remove(const std::string& name) { return users_.erase(name) > 0; }

bool user_store::verify(const std::string& name, const std::string& password) const {
    auto* u = find(name);
    bool ok = check_password(password, u ? u->hash : decoy_hash());
    return u && ok;
}

}  // namespace dmz::proxy
