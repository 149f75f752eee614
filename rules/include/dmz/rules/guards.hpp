#pragma once
/// @file The Exchange template's guards on a request's head: the attack shapes published
/// Exchange must never see (ProxyLogon, ProxyShell, ProxyToken). evaluate() already refuses
/// ProxyShell's autodiscover+powershell URIs; these look at the fields.
#include <optional>
#include <string_view>

#include "dmz/rules/fault.hpp"
#include "dmz/rules/model.hpp"
#include "dmz/rules/path.hpp"

namespace dmz::rules {

/// Fed the head's fields one by one (no allocation); then asked for its verdict.
class exchange_guard {
public:
    exchange_guard(const rule& r, const normalized_target& t) : rule_(r), target_(t) {}
    /// One Cookie field's value.
    void cookie(std::string_view value);
    /// An X-Rps-CAT field, which only Exchange's own front-end may set.
    void rps_cat_field() { rps_cat_field_ = true; }
    /// The refusal (403, rule-denied) when the head has an attack shape.
    std::optional<fault> refusal() const;
    /// An ECP SecurityToken cookie from a client (ProxyToken): dropped before it goes on.
    bool strip_security_token() const { return strip_token_; }

private:
    const rule& rule_;
    const normalized_target& target_;
    bool routing_cookie_ = false, rps_cat_field_ = false, strip_token_ = false;
};

}  // namespace dmz::rules
