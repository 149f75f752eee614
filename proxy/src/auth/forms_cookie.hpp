#pragma once
// Forms-login sessions: the cookie is the whole session (no server-side table), so any
// front-end holding the same key file accepts it.
//
// Cookie value: "v1." base64url(fields) "." base64url(HMAC-SHA256(mac key, "v1." fields)).
// The fields carry the user, login and last-use times, a generation of the user's stored
// hash (a new password or a deleted user ends every session), a random id (for logout)
// and, for basic delegation, the password sealed with AES-256-GCM under a second key.
// Both keys are derived from the 32-byte key file with HMAC-SHA256.
#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>

namespace dmz::proxy {

struct forms_session {
    std::string user;
    std::string password;  ///< for basic delegation; "" when none is kept
    std::string generation;
    std::string id;           ///< random, hex
    std::int64_t issued = 0;  ///< unix seconds
    std::int64_t last = 0;    ///< unix seconds of the last refresh
};

class session_sealer {
public:
    /// Reads the key file, or creates it (32 random bytes as hex, mode 0600, published by
    /// an atomic link so two instances starting together agree on one key). Throws
    /// std::runtime_error naming the file when it is unreadable or malformed.
    static std::shared_ptr<const session_sealer> open(const std::string& key_file);
    /// A sealer from raw key bytes (tests).
    explicit session_sealer(const std::string& key);

    std::string seal(const forms_session& s) const;
    /// nullopt when the value is not one of ours or was tampered with (expiry is the
    /// caller's business: it knows the listener's policy).
    std::optional<forms_session> unseal(std::string_view value) const;

private:
    std::string mac_key_, enc_key_;
};

/// Sessions ended by logout, until their lifetime would have ended them anyway. Per
/// instance (other front-ends sharing the key do not learn of a logout).
class revoked_sessions {
public:
    void revoke(const std::string& id, std::chrono::system_clock::time_point until);
    bool revoked(const std::string& id);

private:
    std::mutex m_;
    std::unordered_map<std::string, std::chrono::system_clock::time_point> ids_;
};

/// The generation of a stored password hash: changes whenever the hash does.
std::string hash_generation(const std::string& stored_hash);

std::string base64url_encode(std::string_view in);
std::optional<std::string> base64url_decode(std::string_view in);

/// application/x-www-form-urlencoded: the value of `name`, decoded ('+' is a space).
std::optional<std::string> form_field(std::string_view body, std::string_view name);
/// Percent-encodes everything but unreserved characters (RFC 3986 2.3).
std::string url_encode(std::string_view in);

}  // namespace dmz::proxy
