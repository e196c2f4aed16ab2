// Who the user is and how requests prove it.
//
// Open dev mode (server without --secret): the identity is a display name, sent as ?name=.
// With --secret: signed tokens from the host app (or from an invite link) arrive as ?token= in
// the page URL; they are kept in sessionStorage (this tab only) and removed from the address bar.
// A token names the room patterns it allows; each room uses the newest token that allows it.

const TOKENS = 'collab.tokens'
const NAME = 'collab.name'

const decodeClaims = (token) => {
  try {
    const part = token.split('.')[1].replace(/-/g, '+').replace(/_/g, '/')
    const json = decodeURIComponent(escape(atob(part + '='.repeat((4 - part.length % 4) % 4))))
    return JSON.parse(json)
  } catch {
    return null
  }
}

const globMatch = (pattern, name) => {
  // fnmatch semantics as on the server (collab.auth uses fnmatchcase): * ? [..]
  let re = '^'
  for (let i = 0; i < pattern.length; i++) {
    const c = pattern[i]
    if (c === '*') re += '.*'
    else if (c === '?') re += '.'
    else if (c === '[') {
      const end = pattern.indexOf(']', i + 1)
      if (end < 0) { re += '\\['; continue }
      let body = pattern.slice(i + 1, end)
      if (body.startsWith('!')) body = '^' + body.slice(1)
      re += '[' + body.replace(/\\/g, '\\\\') + ']'
      i = end
    } else re += c.replace(/[.+^${}()|\\\]]/g, '\\$&')
  }
  try { return new RegExp(re + '$', 's').test(name) } catch { return false }
}

export class Session {
  constructor () {
    this.mode = null // 'dev' | 'token'
    this.user = null // {id, name, role}
    this.tokens = this._loadTokens()
    this.name = sessionStorage.getItem(NAME) || localStorage.getItem(NAME) || ''
    this.devRoles = {} // room -> 'viewer' (dev mode invites; the UI is read-only, nothing enforces it)
  }

  _loadTokens () {
    try {
      const now = Date.now() / 1000
      return JSON.parse(sessionStorage.getItem(TOKENS) || '[]').filter((t) => !t.claims.exp || t.claims.exp > now)
    } catch {
      return []
    }
  }

  _saveTokens () { sessionStorage.setItem(TOKENS, JSON.stringify(this.tokens)) }

  /** Take ?token=, ?name= and ?role= from the address bar (and hide the token). */
  absorbUrl (room) {
    const url = new URL(location.href)
    const token = url.searchParams.get('token')
    const name = url.searchParams.get('name')
    const role = url.searchParams.get('role')
    if (token) {
      const claims = decodeClaims(token)
      if (claims) {
        this.tokens = this.tokens.filter((t) => t.token !== token)
        this.tokens.unshift({ token, claims })
        this._saveTokens()
      }
    }
    if (name && name.trim()) this.setName(name.trim())
    if (role === 'viewer' && room) sessionStorage.setItem('collab.role:' + room, 'viewer')
    if (token || name || role) {
      for (const key of ['token', 'name', 'role']) url.searchParams.delete(key)
      history.replaceState(null, '', url.pathname + (url.search.length > 1 ? url.search : '') + url.hash)
    }
  }

  setName (name) {
    this.name = name
    sessionStorage.setItem(NAME, name)
    localStorage.setItem(NAME, name)
  }

  logout () {
    sessionStorage.removeItem(NAME)
    localStorage.removeItem(NAME)
    sessionStorage.removeItem(TOKENS)
    this.tokens = []
    this.name = ''
  }

  tokenFor (room) {
    if (room == null) return this.tokens[0]?.token || null
    const hit = this.tokens.find((t) => (t.claims.rooms || []).some((p) => globMatch(p, room)))
    return hit ? hit.token : null
  }

  /** Query parameters that identify this user, for the websocket and the API. */
  params (room = null) {
    if (this.mode === 'dev') return this.name ? { name: this.name } : {}
    const token = this.tokenFor(room)
    return token ? { token } : {}
  }

  /** The user's role in a room as far as the client knows it (the server is the authority). */
  roleIn (room) {
    if (this.mode === 'dev') return sessionStorage.getItem('collab.role:' + room) === 'viewer' ? 'viewer' : 'editor'
    const token = this.tokens.find((t) => (t.claims.rooms || []).some((p) => globMatch(p, room)))
    return token?.claims.role || 'viewer'
  }

  async api (path, { method = 'GET', body, room = null } = {}) {
    const url = new URL(path, location.origin)
    for (const [k, v] of Object.entries(this.params(room))) {
      if (k === 'name') url.searchParams.set(k, v)
    }
    const headers = { Accept: 'application/json' }
    const token = this.mode === 'token' ? this.tokenFor(room) : null
    if (token) headers.Authorization = 'Bearer ' + token
    if (body !== undefined) headers['Content-Type'] = 'application/json'
    const response = await fetch(url, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) })
    let data = null
    try { data = await response.json() } catch { data = null }
    if (!response.ok) {
      const error = new Error((data && data.error) || `HTTP ${response.status}`)
      error.status = response.status
      error.data = data
      throw error
    }
    return data
  }

  /** Find out the server's mode and who we are; false if the user must log in first. */
  async resolve (room = null) {
    const url = new URL('/api/me', location.origin)
    const headers = { Accept: 'application/json' }
    if (this.name) url.searchParams.set('name', this.name)
    const token = this.tokenFor(room)
    if (token) headers.Authorization = 'Bearer ' + token
    const response = await fetch(url, { headers })
    const data = await response.json()
    this.mode = data.mode
    if (this.mode === 'dev') {
      if (!this.name) return false
      this.user = data.user
      return true
    }
    if (!response.ok) return false
    this.user = data.user
    return true
  }

  async devLogin (name) {
    const url = new URL('/api/dev/login', location.origin)
    url.searchParams.set('name', name)
    const response = await fetch(url)
    const data = await response.json()
    if (!response.ok) throw new Error(data.error || 'login failed')
    this.setName(name)
    this.user = data.user
    return data.user
  }
}
