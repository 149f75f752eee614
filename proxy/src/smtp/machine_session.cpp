// The session-level commands of the SMTP machine: EHLO and HELO, STARTTLS, AUTH and XCLIENT
// (the identity the next tier hears).
#include "dmz/proxy/smtp/replies.hpp"
#include "machine_impl.hpp"

namespace dmz::smtp::detail {

// ---- EHLO, STARTTLS --------------------------------------------------------------------

step machine_impl::helo(const command& cmd) {
    if (cmd.argument.empty()) return refuse("501 5.5.4 " + cmd.verb + " needs a domain or address literal");
    helo_verb_ = cmd.verb;
    helo_argument_ = cmd.argument;
    // EHLO resets the transaction (RFC 5321 4.1.4): the upstream's too.
    return reset_upstream(awaiting::reset_for_helo);
}

step machine_impl::answer_helo() {
    close_transaction("", "");
    ehlo_ = helo_argument_.substr(0, helo_argument_.find(' '));
    if (helo_verb_ == "EHLO") out_ += capabilities_reply();
    else say("250 " + f_.name + " Hello " + ehlo_ + " [" + f_.client.to_string() + "]");
    return finish(outcome::ok);
}

std::string machine_impl::capabilities_reply() const {
    std::vector<std::string> lines{f_.name + " Hello " + ehlo_ + " [" + f_.client.to_string() + "]",
                                   "SIZE " + std::to_string(f_.max_message_size), "PIPELINING", "8BITMIME",
                                   "ENHANCEDSTATUSCODES", "CHUNKING"};
    if (!tls_ && f_.tls_offered) lines.push_back("STARTTLS");
    if (tls_ && cb_.auth_configured()) lines.push_back("AUTH PLAIN LOGIN");
    if (f_.trusted_peer) lines.push_back("XCLIENT LOGIN");
    return reply{250, lines}.wire();
}

step machine_impl::starttls(const command& cmd) {
    if (tls_) return refuse("503 5.5.1 TLS already active");
    if (!f_.tls_offered) return refuse("502 5.5.1 STARTTLS is not offered on this listener (no certificate)");
    if (!cmd.argument.empty()) return refuse("501 5.5.4 STARTTLS takes no argument");
    // RFC 3207 resets the session after the handshake; a transaction half-made in the clear
    // (and open upstream) is refused instead, as Postfix does.
    if (in_transaction_) return refuse("503 5.5.1 STARTTLS inside a mail transaction; send RSET first");
    say("220 2.0.0 Ready to start TLS");
    state_ = state::tls_handshake;
    return next_io(action::start_tls);
}

// ---- AUTH, XCLIENT ---------------------------------------------------------------------

/// AUTH PLAIN and LOGIN, over TLS only, against the instance's user store. A locked-out
/// user hears what a wrong password hears; the log says which it was.
step machine_impl::auth(const command& cmd) {
    if (!tls_) return refuse("538 5.7.11 Encryption required for requested authentication mechanism (use STARTTLS)");
    if (!cb_.auth_configured())
        return refuse("535 5.7.8 Authentication is not available on this listener (no user store is configured)");
    if (!user_.empty()) return refuse("503 5.5.1 Already authenticated");
    if (in_transaction_) return refuse("503 5.5.1 AUTH is not permitted during a mail transaction");
    auto sp = cmd.argument.find(' ');
    auth_mech_.clear();
    for (char c : cmd.argument.substr(0, sp)) auth_mech_ += static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
    bool initial = sp != std::string::npos;
    std::string first = initial ? cmd.argument.substr(sp + 1) : std::string();
    if (auth_mech_ != "PLAIN" && auth_mech_ != "LOGIN")
        return refuse("504 5.5.4 Unrecognized authentication type (PLAIN and LOGIN are offered)");
    bool plain = auth_mech_ == "PLAIN";
    if (initial) return plain ? auth_plain(first) : auth_login_user(first);
    say(plain ? "334 " : "334 VXNlcm5hbWU6");  // LOGIN: "Username:"
    auth_stage_ = plain ? auth_stage::plain_response : auth_stage::login_user;
    state_ = state::auth_response;
    return next_io(action::read_auth_line);
}

step machine_impl::on_auth_line(std::string_view line) {
    std::string response(line);
    switch (auth_stage_) {
    case auth_stage::plain_response: return auth_plain(response);
    case auth_stage::login_user: return auth_login_user(response);
    case auth_stage::login_password: return auth_login_password(response);
    }
    return finish(outcome::end);
}

step machine_impl::auth_plain(const std::string& response) {
    if (cancelled(response)) return finish(outcome::client_error);
    auto d = decode(response);
    auto c = d ? parse_sasl_plain(*d) : std::nullopt;
    if (!c) return refuse("501 5.5.2 Malformed PLAIN response");
    return verify(c->user, c->password);
}

step machine_impl::auth_login_user(const std::string& response) {
    if (cancelled(response)) return finish(outcome::client_error);
    auth_user_ = decode(response);
    say("334 UGFzc3dvcmQ6");  // "Password:"
    auth_stage_ = auth_stage::login_password;
    state_ = state::auth_response;
    return next_io(action::read_auth_line);
}

step machine_impl::auth_login_password(const std::string& response) {
    if (cancelled(response)) return finish(outcome::client_error);
    auto p = decode(response);
    if (!auth_user_ || !p || auth_user_->empty()) return refuse("501 5.5.2 Malformed LOGIN response");
    return verify(*auth_user_, *p);
}

/// The check runs off the event loop (scrypt is slow on purpose): the session does it and
/// answers with `on_credentials`.
step machine_impl::verify(const std::string& user, const std::string& password) {
    checking_user_ = user;
    state_ = state::auth_check;
    step s = next_io(action::check_credentials);
    s.user = user;
    s.password = password;
    return s;
}

step machine_impl::on_credentials(const login_result& r) {
    state_ = state::command;
    if (!r.ok) {
        // RFC 4954 6: 454 when the server cannot check now (the checks are saturated).
        int code = r.overloaded ? 454 : 535;
        say(r.overloaded ? "454 4.7.0 Temporary authentication failure" : "535 5.7.8 Authentication credentials invalid");
        log_entry e;
        e.user = checking_user_;
        e.ehlo = ehlo_;
        e.denied = true;
        e.status = code;
        e.fault = make_fault(r.overloaded ? fault_class::overloaded : fault_class::auth_failed, code,
                             "AUTH " + auth_mech_ + " refused for '" + checking_user_ + "' (" + r.refusal + ")");
        e.since = clock_type::now();
        cb_.log(e);
        return finish(outcome::client_error);
    }
    user_ = r.user;
    say("235 2.7.0 Authentication successful");
    return pass_identity();
}

/// XCLIENT LOGIN from a trusted previous tier: the user that tier authenticated. The reply
/// is a new greeting (as Postfix does); the client says EHLO again.
step machine_impl::xclient(const command& cmd) {
    if (!f_.trusted_peer) return refuse("550 5.7.0 XCLIENT is accepted only from a trusted previous tier");
    if (in_transaction_) return refuse("503 5.5.1 XCLIENT is not permitted during a mail transaction");
    auto x = parse_xclient(cmd.argument);
    if (!x.error.empty()) return refuse(x.error);
    if (x.login) user_ = *x.login;
    ehlo_.clear();
    say("220 " + f_.name + " ESMTP dmzproxy");
    return pass_identity();
}

/// Tells the next tier who authenticated, with XCLIENT LOGIN (Postfix's extension) when it
/// offers it: that tier answers with a new greeting, and EHLO starts over. A next tier
/// without XCLIENT (Exchange) decides relaying by its own connector permissions.
step machine_impl::pass_identity() {
    if (!caps_.xclient_login || !upstream_ready_) return finish(outcome::ok);
    return upstream_command(awaiting::xclient,
                            "XCLIENT LOGIN=" + (user_.empty() ? std::string("[UNAVAILABLE]") : xtext_encode(user_)));
}

step machine_impl::on_xclient_reply(const reply& r) {
    if (r.code != 220) {
        identity_refused_ = reply_text(r);
        return finish(outcome::ok);  // the next tier judges the session as anonymous
    }
    return upstream_command(awaiting::xclient_ehlo, "EHLO " + f_.name);
}

step machine_impl::on_xclient_ehlo_reply(const reply& r) {
    if (r.code != 250) return on_upstream_lost("the upstream refused EHLO after XCLIENT: " + r.text());
    caps_ = parse_capabilities(r);
    return finish(outcome::ok);
}

}  // namespace dmz::smtp::detail
